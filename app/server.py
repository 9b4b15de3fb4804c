"""The web app: our FastAPI app with the Gradio page mounted on it (app/webserver.py serves it).

Owning the app (instead of letting Gradio launch its own) gives one place for what Gradio does
not do for us: refusing uploads and oversized bodies before they are read, serving download
links to their owners only, answering /healthz (which the loading page polls) and serving the
OpenAI-compatible API under /v1 (app/openai_api.py) on the same port and services as the page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.middleware.cors import CORSMiddleware

from .downloads import ROUTE as DOWNLOADS_ROUTE
from .downloads import zip_response
from .errors import OUTAGES, as_outage, describe
from .limits import client_address
from .openai_api import api_router
from .page_login import auth_router
from .services import Services
from .ui import CSS

UPLOAD_ROUTES = ("/upload", "/process_recording", "/component_server")
"""Gradio's routes that take files; the app has no component that needs them."""
MAX_BODY_BYTES = 256 * 1024
"""Largest request body: a chat message is at most a few thousand characters; nothing is uploaded."""

access_log = logging.getLogger("memchat.access")


class RequestGuard:
    """ASGI middleware: no uploads (the app uses none) and no body above MAX_BODY_BYTES.

    Files reach Gradio as multipart bodies (its upload, recording and component routes), so every
    multipart request is refused, whatever its path. A declared Content-Length above the cap is
    refused before the app sees the request; a streamed body is cut off where it passes the cap
    (the app then sees a disconnect)."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if b"multipart/" in headers.get(b"content-type", b"").lower() or scope["path"].rstrip("/").endswith(
                UPLOAD_ROUTES):
            return await _refuse(send, 403, "This app takes no file uploads.", "uploads_refused")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await _refuse(send, 413, f"Request too large (at most {self.max_body_bytes // 1024} KiB).",
                                 "request_too_large")
        received = 0

        async def capped_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_body_bytes:
                    return {"type": "http.disconnect"}
            return event

        return await self.app(scope, capped_receive, send)


SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),  # no page of ours inside another site's frame (clickjacking)
    (b"content-security-policy", b"frame-ancestors 'none'"),  # the same, as browsers now read it
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # download links and page state never leak in a Referer
]


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response, the page's, the API's and the downloads'."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(event):
            if event["type"] == "http.response.start":
                names = {name.lower() for name, _ in event.get("headers", [])}
                event["headers"] = [*event.get("headers", []), *(h for h in SECURITY_HEADERS if h[0] not in names)]
            await send(event)

        return await self.app(scope, receive, with_headers)


class AccessLog:
    """ASGI middleware: one line per HTTP request at INFO, when it ends: method, path, status,
    milliseconds and the user id when the request named one (an API key's; the page's calls say
    "-"). Never a key, a password, a query string or a download link's token."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), None
        state = scope.setdefault("state", {})  # Starlette's request.state (openai_api's user_of writes it)

        async def watched(event):
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
            await send(event)

        try:
            await self.app(scope, receive, watched)
        finally:
            path = scope["path"]
            if path.startswith(DOWNLOADS_ROUTE + "/"):
                path = DOWNLOADS_ROUTE + "/…"  # the link's token is its owner's secret
            access_log.info("%s %s %s %.0f ms user %s", scope["method"], _loggable(path), status or "-",
                            (time.perf_counter() - started) * 1000, state.get("user_id", "-"))


def _loggable(path: str) -> str:
    """A path as one log line may show it: at most 200 characters, no control characters."""
    return "".join(ch if ch.isprintable() else "?" for ch in path[:200])


class StreamsEnd:
    """What ends the page's long-lived streams when the server stops (see EndingStreams)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._ended = threading.Event()

    def bind(self) -> asyncio.Event:
        """The event that says so, made in the server's event loop (at its first request)."""
        if self._event is None:
            self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
            if self._ended.is_set():
                self._event.set()
        return self._event

    def end(self) -> None:
        """From any thread: every stream of the page ends as if its client had gone."""
        self._ended.set()
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)


class EndingStreams:
    """ASGI middleware: once `streams.end()` is called, the page's open streams (Gradio's heartbeats
    and queue data, which a browser tab keeps open) read a disconnect and end, instead of being
    cancelled by uvicorn after its graceful second, which logs a traceback per open tab. The API's
    streams under /v1 are left alone: `python app.py` stops the inference loop before the server
    (Ctrl+C and SIGTERM land in the loop), and they end with its 503-shaped event."""

    def __init__(self, app, streams: StreamsEnd) -> None:
        self.app, self.streams = app, streams

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        ended = self.streams.bind()

        async def receive_until_end():
            if ended.is_set():
                return {"type": "http.disconnect"}
            received = asyncio.ensure_future(receive())
            ending = asyncio.ensure_future(ended.wait())
            done, _ = await asyncio.wait({received, ending}, return_when=asyncio.FIRST_COMPLETED)
            if received in done:
                ending.cancel()
                return received.result()
            received.cancel()
            return {"type": "http.disconnect"}

        return await self.app(scope, receive_until_end, send)


class ApiCors:
    """ASGI middleware: CORS for the API under /v1 only, for the origins named by --cors-origins
    (Starlette's CORSMiddleware); without any, no cross-origin page may call the API (the default)."""

    def __init__(self, app, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                                   allow_headers=["Authorization", "Content-Type"], max_age=600)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            return await self.cors(scope, receive, send)
        return await self.app(scope, receive, send)


async def _refuse(send, status: int, message: str, code: str) -> None:
    """An error in the shape OpenAI's API uses (app/openai_api.py), which the page's scripts read too."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(services: Services, ui: gr.Blocks) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz():
        """Ready while the database answers: a load balancer sends nobody to a replica that cannot reach it."""
        try:
            services.storage.ping()
        except Exception as e:  # noqa: BLE001 - an outage is an answer here; anything else is a fault
            if as_outage(e) is None:
                raise
            return JSONResponse({"ready": False, "database": "unreachable"}, status_code=503,
                                headers={"Cache-Control": "no-store"})
        return {"ready": True}

    async def outage(request: Request, error: Exception) -> JSONResponse:
        """A route's request that met an outage of the database or Redis: a clear 503, not a fault."""
        if as_outage(error) is None:  # a database error that is not an outage (a deadlock, a bad query)
            raise error
        message = describe(error, f"{request.method} {request.url.path}")
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": "unavailable"}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5", "Cache-Control": "no-store"})

    for kind in OUTAGES:
        app.add_exception_handler(kind, outage)

    @app.get(DOWNLOADS_ROUTE + "/{token}")
    def download(token: str, request: Request):
        found = services.downloads.find(token, client_address(request), services.accounts.exists)
        gone = PlainTextResponse("This download link has expired or is not yours. Export again from the app.",
                                 status_code=404, headers={"Cache-Control": "no-store"})
        return gone if found is None else zip_response(*found)

    app.include_router(auth_router(services.accounts))  # the page's login cookie
    app.include_router(api_router(services))  # before the page, which is mounted at / and takes every other path
    # run_history=False: Gradio would otherwise keep every call's inputs (passwords included) in the
    # browser's localStorage; it also deletes what an older version of the page saved there.
    gr.mount_gradio_app(app, ui, path="/", run_history=False, footer_links=[], show_error=False,
                        max_file_size="1kb", css=CSS)
    app.add_middleware(RequestGuard)
    origins = [o.strip() for o in (services.settings.cors_origins or "").split(",") if o.strip()]
    if origins:
        app.add_middleware(ApiCors, origins=origins)
    app.add_middleware(SecurityHeaders)  # refusals of the guard get the headers too
    app.state.streams = StreamsEnd()
    app.add_middleware(EndingStreams, streams=app.state.streams)
    app.add_middleware(AccessLog)  # the outermost: every request is logged, refused ones too
    return app
