"""An ASGI app served by uvicorn in a daemon thread: the loading page and then the app itself.

start() returns once the port listens; stop() returns once it is free again, so that the next
server can bind the same port at once (the loading page hands it to the app this way).
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

log = logging.getLogger(__name__)


def server_url(host: str, port: int) -> str:
    """The address to open in a browser on this machine."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class WebServer:
    def __init__(self, app, host: str, port: int, name: str = "web-server", **config) -> None:
        """`config`: further uvicorn.Config settings. Requests in flight get 1 s at a stop."""
        self.app, self.host, self.port = app, host, port
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=1,
                                                     **config))
        # uvicorn installs signal handlers only from the main thread, so Ctrl+C stays the app's
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.url = server_url(host, port)

    def start(self, timeout_s: float = 60.0) -> None:
        """Return once the port listens; OSError if it cannot be bound (e.g. already in use)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"nothing could listen on {self.host}:{self.port} (is the port in use? see the log)")
            if time.monotonic() > deadline:
                self._server.should_exit = True
                raise TimeoutError(f"nothing listened on {self.host}:{self.port} within {timeout_s:.0f} s")
            time.sleep(0.01)

    def _serve(self) -> None:
        try:
            self._server.run()
        except SystemExit:  # uvicorn's answer to a port it cannot bind (it has logged why); start() reports it
            pass

    def wait(self) -> None:
        """Block until the server stops; Ctrl-C stops it."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            log.info("stopping")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut down and return once the listening socket is closed.

        uvicorn closes its listening sockets, closes idle keep-alive connections, finishes
        requests in flight (at most 1 s) and then its thread ends; joining it is the wait."""
        if not self._thread.is_alive():
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the server on port {self.port} did not stop within {timeout_s:.0f} s")

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
