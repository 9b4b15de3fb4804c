"""The page's login: a cookie the server sets, which no script of the page can read.

A browser logs in or signs up with a POST to /auth/login or /auth/signup (JSON, from the page's
own script); the answer sets the login's secret (256 random bits, app/accounts.py and storage's
login_sessions) as an HttpOnly, SameSite=Strict cookie without an expiry date: it never appears
in a URL or in the page, no script reads it, the browser drops it when it closes (unless it
restores sessions), and the server ends the login after its idle time or lifetime, at logout and
with the account. The browser then sends it with every event of the page, and each handler acts
as the login it names (`with_login`), not as whatever Gradio's session (a hash the browser makes
up and sends in URLs) last held. A request that another origin's page sent (Sec-Fetch-Site,
Origin) acts as nobody.

    POST /auth/login|signup {"username", "password"} -> 200 {"username", "admin"} + Set-Cookie
    POST /auth/logout [?everywhere=1]                 -> 200 {"ended": n}, the cookie cleared
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from urllib.parse import urlsplit

import anyio
import gradio as gr
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .accounts import Accounts, Login
from .errors import AccessDenied, AppError, InvalidInput, LoginFailed, RateLimited, Unavailable, as_outage, describe
from .limits import client_address

LOGIN_COOKIE = "memchat_login"
AUTH_ROUTE = "/auth"


def page_login(request: object) -> str | None:
    """The secret of the login whose cookie came with a request (Starlette's or Gradio's); None
    without one, or when another origin's page sent it: SameSite=Strict keeps other sites' requests
    without the cookie, but not those of another port or subdomain of this site, which Gradio's
    CORS would let read the answers."""
    if not same_origin(request):
        return None
    cookies = getattr(request, "cookies", None) or {}
    secret = cookies.get(LOGIN_COOKIE)
    return secret if isinstance(secret, str) and secret else None


def same_origin(request: object) -> bool:
    """Whether a request comes from this site's own pages, or from no page at all (a script or
    client of its own): browsers say which page sent it in Sec-Fetch-Site and Origin."""
    headers = getattr(request, "headers", None) or {}
    if headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
        return False
    origin = headers.get("origin")
    return not origin or urlsplit(origin).netloc == headers.get("host")


def with_login(fn: Callable) -> Callable:
    """A page handler whose first argument is the login of the browser that sent the event (its
    cookie; None without one): wired without that input, Gradio passes the event's request instead."""
    params = list(inspect.signature(fn).parameters.values())
    # a name of its own: fn may take the request too (Gradio then passes it twice)
    request_param = inspect.Parameter("login_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
    hints = {name: hint for name, hint in typing.get_type_hints(fn).items() if name != "return"}  # resolved in fn's module

    if inspect.isgeneratorfunction(fn):
        def handler(request, *args, **kwargs):
            yield from fn(page_login(request), *args, **kwargs)
    else:
        def handler(request, *args, **kwargs):
            return fn(page_login(request), *args, **kwargs)
    functools.update_wrapper(handler, fn, updated=())
    del handler.__wrapped__  # Gradio reads the signature below, not fn's
    handler.__signature__ = inspect.Signature([request_param, *params[1:]])
    handler.__annotations__ = {"login_request": gr.Request, **hints}
    return handler


def auth_router(accounts: Accounts) -> APIRouter:
    router = APIRouter(prefix=AUTH_ROUTE)

    def entered(request: Request, login: Login) -> JSONResponse:
        answer = JSONResponse({"username": login.account.username, "admin": login.account.is_admin},
                              headers={"Cache-Control": "no-store"})
        # no max_age: a session cookie, gone with the browser; the server ends the login itself
        answer.set_cookie(LOGIN_COOKIE, login.secret, httponly=True, samesite="strict", path="/",
                          secure=request.url.scheme == "https")
        return answer

    async def credentials(request: Request) -> tuple[object, object]:
        """The form's username and password; refused unless JSON from this site's own page (a
        form on another site can send neither JSON nor, with SameSite=Strict, the cookie)."""
        if not same_origin(request):
            raise AccessDenied("Log in from this site's own page")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise InvalidInput("body", "must be JSON: {\"username\": ..., \"password\": ...}")
        try:
            body = await request.json()
        except ValueError:
            raise InvalidInput("body", "is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidInput("body", "must be a JSON object")
        return body.get("username"), body.get("password")

    def refused(error: Exception, action: str) -> JSONResponse:
        message = describe(error, action)
        error = as_outage(error) or error
        status = (503 if isinstance(error, Unavailable) else 429 if isinstance(error, RateLimited)
                  else 401 if isinstance(error, LoginFailed)
                  else 403 if isinstance(error, AccessDenied) else 400 if isinstance(error, AppError) else 500)
        headers = {"Cache-Control": "no-store"}
        if isinstance(error, RateLimited):
            headers["Retry-After"] = str(error.retry_after_s)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def endpoint(action: str, enter: Callable[[object, object, str | None], Login]):
        async def answer(request: Request) -> JSONResponse:
            try:
                name, password = await credentials(request)
                # the services block on the database and hash passwords: a worker thread, as FastAPI would
                login = await anyio.to_thread.run_sync(enter, name, password, client_address(request))
                if earlier := page_login(request):  # the browser's earlier login, replaced by this one, ends
                    await anyio.to_thread.run_sync(accounts.log_out, earlier)
            except Exception as e:  # noqa: BLE001 - describe() logs faults with their traceback
                return refused(e, action)
            return entered(request, login)
        return answer

    router.add_api_route("/login", endpoint("log in", accounts.log_in), methods=["POST"])
    router.add_api_route("/signup", endpoint("sign up", accounts.sign_up), methods=["POST"])

    @router.post("/logout")
    def log_out(request: Request, everywhere: bool = False) -> JSONResponse:
        """End this browser's login (everywhere: every login of its user) and clear its cookie;
        refused from another origin's page (which could only log the person out)."""
        if not same_origin(request):
            return refused(AccessDenied("Log out from this site's own page"), "log out")
        login = page_login(request)
        ended = accounts.log_out(login, everywhere=everywhere) if login else 0
        answer = JSONResponse({"ended": ended}, headers={"Cache-Control": "no-store"})
        answer.delete_cookie(LOGIN_COOKIE, path="/", httponly=True, samesite="strict",
                             secure=request.url.scheme == "https")
        return answer

    return router
