"""Helpers of the app tests (fixtures are in conftest.py)."""

from __future__ import annotations

import socket
import time


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


class Visitor:
    """One browser session over HTTP (gradio_client): calls the page's named events and reads their
    outputs by the components' elem_id, as a person reads the page."""

    def __init__(self, running) -> None:
        from gradio_client import Client
        self.running = running
        self.client = Client(running.url, verbose=False)

    def call(self, api_name: str, *args) -> dict:
        result = self.client.predict(*args, api_name=f"/{api_name}")
        result = result if isinstance(result, tuple) else (result,)
        outputs = next(fn.outputs for fn in self.running.ui.fns.values() if fn.api_name == api_name)
        shown = [block for block in outputs if not block.skip_api]  # what the API returns: no states, no layout
        return {block.elem_id: value for block, value in zip(shown, result, strict=True) if block.elem_id}
