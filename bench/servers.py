"""Servers the HTTP sections start as their users would start them, each on a free loopback port:
`app.py` in one process (bench.replicas, bench.serving), llama.cpp's `llama-server` (bench.serving)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from .clients import WAIT_S

ROOT = Path(__file__).resolve().parents[1]

LOOSE_LIMITS = {  # the workload is many users from one address sending fast: no limit may refuse it
    "MEMCHAT_SIGNUPS_PER_ADDRESS": "100000/hour", "MEMCHAT_SIGNUPS_PER_SERVER": "100000/hour",
    "MEMCHAT_MESSAGES_PER_USER": "100000/minute", "MEMCHAT_ACTIONS_PER_USER": "100000/minute",
}


def app_env() -> dict[str, str]:
    """An app process's environment: nothing of a developer's setup (MEMCHAT_*), LOOSE_LIMITS."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MEMCHAT_")} | LOOSE_LIMITS


@dataclass(frozen=True)
class AppFlags:
    """What the bench itself runs on, passed to every app process so that they run the same."""

    device: str
    model: str | None = None
    checkpoint: str | None = None
    int4_decode: bool = True

    @classmethod
    def of(cls, args) -> AppFlags:
        """From the bench's command line (bench.__main__.model_arguments)."""
        return cls(args.device, args.model, args.checkpoint, args.int4_decode)

    def args(self, reply_tokens: int) -> list[str]:
        """app.py's flags: these, no compression but the one asked for, replies of at most reply_tokens."""
        args = ["--device", self.device, "--compressor", "generator", "--compress-every", "1000000",
                "--compress-idle-seconds", "0", "--max-new-tokens", str(reply_tokens),
                "--int4-decode" if self.int4_decode else "--no-int4-decode"]
        args += ["--model", self.model] if self.model else []
        return args + (["--checkpoint", self.checkpoint] if self.checkpoint else [])


def free_port_base(offsets: tuple[int, ...], start: int = 41000) -> int:
    """A port p with p + each offset free on loopback."""
    for base in range(start, 60000, 50):
        try:
            for offset in offsets:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def wait_ready(url: str, process: subprocess.Popen, ready) -> None:
    """Until ready(response of GET url) is true; RuntimeError if the process stops first or it takes
    longer than WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} stopped while starting (exit {process.returncode})")
        try:
            if ready(httpx.get(url, timeout=5)):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {WAIT_S:.0f} s")


def app_ready(response: httpx.Response) -> bool:
    """The app's /healthz once the model is loaded (its loading page says not yet)."""
    return bool(response.json().get("ready"))


@contextmanager
def _serving(command: list[str], log_path: Path, health: str, ready, env: dict[str, str] | None = None):
    """The process of `command`, its output in log_path, once GET `health` is ready: stopped after
    (SIGTERM, then SIGKILL after a minute)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        wait_ready(health, process, ready)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def one_process(folder: Path, cache: Path, args: list[str], env: dict[str, str]):
    """`app.py` serving on a free port, its data in folder / "data" (the model from `cache`): its address."""
    data = folder / "data"
    data.mkdir(parents=True)
    (data / "model-cache").symlink_to(cache)  # the converted model, not made again
    port = free_port_base((0,))
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(ROOT / "app.py"), "--data-dir", str(data), "--port", str(port), *args]
    with _serving(command, folder / "app.log", url + "healthz", app_ready, env):
        yield url


@contextmanager
def llama_server(binary: Path, gguf: Path, threads: int, slots: int, slot_tokens: int, log_path: Path):
    """llama.cpp's server on `gguf`: `slots` sequences decoded together (continuous batching, as it
    ships), each with room for slot_tokens, on `threads` threads; its address, once the model is loaded."""
    port = free_port_base((0,))
    url = f"http://127.0.0.1:{port}/"
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
               "-tb", str(threads), "--parallel", str(slots), "-c", str(slots * slot_tokens)]
    with _serving(command, log_path, url + "health", lambda r: r.status_code == 200):
        yield url
