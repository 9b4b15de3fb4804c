"""Helpers of the app tests (fixtures are in conftest.py)."""

from __future__ import annotations

import io
import socket
import threading
import time
import zipfile

import httpx

from adapter_core.serving.decoding import Reply, ReplyRequest
from app.chat import FinishedReply
from app.launch import RunningApp, start
from app.worker import CompressionWorker
from tests.storage.helpers import FAST


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


class SlowStart:
    """The app started (not blocking) in a thread with its model load held until release(): the
    port answers with the loading page meanwhile."""

    def __init__(self, app_settings, engine, monkeypatch) -> None:
        self._engine, self._loaded, self._started = engine, threading.Event(), {}
        monkeypatch.setattr("app.launch.load_engine", self._load)
        self._thread = threading.Thread(
            target=lambda: self._started.setdefault("app", start(app_settings, None, FAST, block=False)))
        self._thread.start()

    def _load(self, *args, **kwargs):
        self._loaded.wait(30)
        return self._engine

    def release(self) -> RunningApp:
        """Let the model load; the running app once it serves."""
        self._loaded.set()
        self._thread.join(60)
        return self._started["app"]


def chat(services, user_id, text) -> tuple[str, FinishedReply]:
    """One whole turn: the text as streamed, and the reply as stored with its stats."""
    parts = list(services.chat.reply(user_id, text))
    assert isinstance(parts[-1], FinishedReply) and all(isinstance(p, str) for p in parts[:-1])
    return "".join(parts[:-1]), parts[-1]


def run_jobs(services) -> None:
    """Every due compression, as the background worker would run them."""
    worker = CompressionWorker(services.memory)
    while worker.run_once():
        pass


def exported(services, download) -> zipfile.ZipFile:
    """The file behind a download link, opened as its owner would."""
    data, _ = services.downloads.find(download.token, None, services.accounts.exists)
    return zipfile.ZipFile(io.BytesIO(data))


class FakeStream:
    """Stands in for the inference loop's ReplyStream: yields the pieces (waiting on `gate` after
    the first, if given) and ends as `finish`."""

    def __init__(self, request: ReplyRequest, pieces: list[str], finish: str = "end",
                 gate: threading.Event | None = None) -> None:
        self.request, self.pieces, self.finish, self.gate = request, pieces, finish, gate
        self.cancelled = threading.Event()

    def __iter__(self):
        for i, piece in enumerate(self.pieces):
            yield piece
            if i == 0 and self.gate is not None:
                self.gate.wait(20)

    def cancel(self) -> None:
        self.cancelled.set()

    def result(self) -> Reply:
        return Reply(tokens=tuple(range(len(self.pieces))), text="".join(self.pieces).strip(), finish=self.finish,
                     prompt_tokens=len(self.request.prompt), first_token_s=0.01, total_s=0.02)


def browser(login: str | None):
    """The request of an event from a browser whose login cookie holds `login` (None: no cookie),
    for calling a page handler directly."""
    from types import SimpleNamespace

    from app.page_login import LOGIN_COOKIE
    return SimpleNamespace(cookies={LOGIN_COOKIE: login} if login else {}, client=None, headers={})


# As long as a browser's fetch waits: httpx's own 5 s is shorter than a busy 2-core CI machine
# took to sign up 20 people at once while others chatted (ReadTimeout, the page never failed).
AUTH_TIMEOUT_S = 60.0


class Visitor:
    """One browser session over HTTP (gradio_client): calls the page's named events and reads their
    outputs by the components' elem_id, as a person reads the page."""

    def __init__(self, running) -> None:
        self.running = running
        self.cookies: dict[str, str] = {}  # the browser's cookies: its login, once /auth set it
        self.client = self._client()
        self.page: dict = {}  # what the page shows, by elem_id, as the events left it

    def _client(self):
        from gradio_client import Client
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return Client(self.running.url, verbose=False, headers={"Cookie": cookie} if cookie else None)

    def auth(self, action: str, body: object = None) -> httpx.Response:
        """POST /auth/<action> as the page's script does, keeping the cookies it sets or clears."""
        answer = httpx.post(f"{self.running.url.rstrip('/')}/auth/{action}", json=body, cookies=self.cookies,
                            timeout=AUTH_TIMEOUT_S)
        cookies = dict(self.cookies)
        for name in answer.headers.get_list("set-cookie"):
            key, _, rest = name.partition("=")
            value = rest.split(";")[0].strip('"')
            if value and "max-age=0" not in name.lower():
                cookies[key] = value
            else:
                cookies.pop(key, None)
        if cookies != self.cookies:
            self.cookies = cookies
            self.client = self._client()  # its headers are fixed when made
        return answer

    def call(self, api_name: str, *args) -> dict:
        """The page after the event: its updates applied in turn to what the page showed (a
        streamed event's too), an update that skips a component leaving it as it was. Log in and
        sign up first ask /auth, and a logout clears the cookie after, as the page's script does."""
        if api_name in ("login", "signup"):
            name, password = args
            answer = self.auth(api_name, {"username": name, "password": password})
            args = (name, password, "" if answer.is_success else answer.json()["error"])
        page = self._event(api_name, *args)
        if api_name in ("logout", "logout_everywhere"):
            self.auth("logout")
        return page

    def _event(self, api_name: str, *args) -> dict:
        job = self.client.submit(*args, api_name=f"/{api_name}")
        last = job.result()  # first: outputs() holds every update only once the job is done
        updates = [u if isinstance(u, tuple) else (u,) for u in [*job.outputs(), last]]
        outputs = next(fn.outputs for fn in self.running.ui.fns.values() if fn.api_name == api_name)
        shown = [block for block in outputs if not block.skip_api]  # what the API returns: no states, no layout
        for update in updates:
            for block, value in zip(shown, update, strict=True):
                if block.elem_id and not _skipped(value):
                    self.page[block.elem_id] = value
        return dict(self.page)


def _skipped(value) -> bool:
    """An update that leaves the component as it is (gr.skip(), as the API sends it)."""
    return isinstance(value, dict) and value.get("__type__") == "update" and "value" not in value
