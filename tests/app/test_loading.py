"""The loading page served while the model loads: its routes, its progress record, the hand-over."""

from __future__ import annotations

import json
import socket
import stat
import time

import httpx
import pytest

from app.loading import (FIRST_START_GUESS_S, FIRST_START_HINT, LoadingServer, StartupProgress, process_started,
                         render_page)
from tests.app.helpers import free_port

STEPS = ["database", "language model", "memory generator", "web server"]


def _bar_tag(page: str) -> str:
    start = page.index('<div id="bar"')
    return page[start:page.index(">", start) + 1]


@pytest.fixture
def progress(tmp_path) -> StartupProgress:
    return StartupProgress(STEPS, tmp_path / "data" / "startup.json")


@pytest.fixture
def server(progress):
    loading = LoadingServer(progress, "127.0.0.1", free_port())
    loading.start()
    yield loading
    loading.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=5) as c:
        yield c


def test_page_is_html_with_the_steps(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"  # the reload must fetch the real app
    page = response.text
    assert "<title>memchat is starting</title>" in page
    for step in STEPS:
        assert f">{step}</li>" in page
    assert '<li class="current" aria-current="step">database</li>' in page
    assert 'role="progressbar"' in page
    assert "http://" not in page and "https://" not in page  # self-contained: no external assets
    # Any page the browser asks for (a bookmark, a reload on a deep link) gets the page too.
    deep = client.get("/some/page", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert deep.status_code == 200 and "memchat is starting" in deep.text


def test_healthz_says_not_ready_and_follows_begin(client, progress):
    health = client.get("/healthz").json()
    assert health["ready"] is False and health["loading"] is True
    assert (health["step"], health["current"], health["steps"]) == (0, "database", STEPS)
    progress.begin("language model", "converting the model")
    health = client.get("/healthz").json()
    assert (health["step"], health["current"], health["detail"]) == (1, "language model", "converting the model")
    assert '<li class="current" aria-current="step">language model</li>' in client.get("/").text
    # Even once the record says ready, this server does not: only the real app may trigger the reload.
    progress.ready()
    assert client.get("/healthz").json()["ready"] is False


@pytest.mark.parametrize("method, path", [("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/info"),
                                          ("POST", "/healthz"), ("DELETE", "/anything")])
def test_other_requests_are_503_with_retry_after(client, method, path):
    response = client.request(method, path, headers={"accept": "application/json"})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.json() == {"error": {"message": "memchat is starting; try again shortly", "type": "loading",
                                         "param": None, "code": "model_loading"}}


def test_stop_frees_the_port_for_the_real_server(progress):
    port = free_port()
    loading = LoadingServer(progress, "127.0.0.1", port)
    loading.start()
    with httpx.Client() as c:  # a keep-alive connection still open, like a polling page's
        assert c.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        loading.stop()
        # Bound the way uvicorn (asyncio) and Gradio bind: with SO_REUSEADDR.
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
        # And a real server takes the port at once and serves.
        successor = LoadingServer(progress, "127.0.0.1", port)
        successor.start()
        try:
            assert c.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        finally:
            successor.stop()


def test_start_on_a_busy_port_raises(progress):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            LoadingServer(progress, "127.0.0.1", s.getsockname()[1]).start()


def test_a_first_start_says_so_and_its_bar_moves_against_a_guess(tmp_path):
    now = [100.0]
    first = StartupProgress(STEPS, tmp_path / "startup.json", clock=lambda: now[0])
    snap = first.snapshot()
    assert snap.expected is None and snap.share == 0.0
    page = render_page(snap)
    assert 'aria-valuenow="0"' in _bar_tag(page) and '<p id="hint">' + FIRST_START_HINT in page
    now[0] += FIRST_START_GUESS_S / 2
    assert first.snapshot().share == pytest.approx(0.5)  # the bar moves though nothing was recorded


def test_the_clock_counts_from_the_process_start():
    """app.py gives the process's start: the imports before the loading page are counted too."""
    started = process_started()
    assert time.monotonic() - 86400 <= started <= time.monotonic()
    own = ps_age()
    assert own is None or abs((time.monotonic() - started) - own) < 2.0
    progress = StartupProgress(STEPS, started=time.monotonic() - 7.0)
    assert progress.snapshot().elapsed >= 7.0


def ps_age() -> float | None:
    """This process's age from `ps` (None where there is no ps)."""
    import os
    import subprocess

    try:
        out = subprocess.run(["ps", "-o", "etimes=", "-p", str(os.getpid())], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return float(out.stdout.strip())


def test_ready_records_the_duration_for_the_next_start(tmp_path):
    now = [100.0]
    timing = tmp_path / "data" / "startup.json"
    first = StartupProgress(STEPS, timing, clock=lambda: now[0])
    now[0] += 42.0
    first.ready()
    assert json.loads(timing.read_text()) == {"seconds": 42.0}
    assert stat.S_IMODE(timing.stat().st_mode) == 0o600
    assert [p.name for p in timing.parent.iterdir()] == ["startup.json"]  # no temp file left behind

    second = StartupProgress(STEPS, timing, clock=lambda: now[0])
    now[0] += 21.0
    snap = second.snapshot()
    assert snap.expected == 42.0 and snap.share == pytest.approx(0.5)
    page = render_page(snap)
    assert 'aria-valuenow="50"' in _bar_tag(page) and '<p id="hint" hidden>' in page
    now[0] += 100.0  # slower than last time: the bar waits near the end instead of filling up
    assert second.snapshot().share == pytest.approx(0.95)


@pytest.mark.parametrize("content", ["not json", '{"seconds": -3}', '{"seconds": "NaN"}', "[]"])
def test_a_damaged_timing_file_counts_as_a_first_start(tmp_path, content):
    timing = tmp_path / "startup.json"
    timing.write_text(content)
    assert StartupProgress(STEPS, timing).snapshot().expected is None


def test_failed_start_shows_its_message_escaped(client, progress):
    progress.begin("language model")
    progress.fail("model file <broken> & unreadable")
    assert client.get("/healthz").json()["failed"] == "model file <broken> & unreadable"
    page = client.get("/").text
    assert 'role="alert">model file &lt;broken&gt; &amp; unreadable</p>' in page
    assert "<broken>" not in page
    assert "<h1 id=\"heading\">memchat could not start</h1>" in page and '<p id="hint" hidden>' in page


def test_step_names_and_detail_are_escaped():
    progress = StartupProgress(["<b>db</b>", "model"])
    progress.begin("model", 'a "quoted" <i>detail</i>')
    page = render_page(progress.snapshot())
    assert "<b>db</b>" not in page and "&lt;b&gt;db&lt;/b&gt;" in page
    assert "<i>detail</i>" not in page


def test_unknown_step_is_refused():
    with pytest.raises(ValueError, match="unknown start-up step"):
        StartupProgress(STEPS).begin("coffee")
