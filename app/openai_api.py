"""An OpenAI-compatible API on the page's port and services, so that any chat client that speaks
OpenAI's chat completions (Open WebUI, LibreChat, scripts using the `openai` package) talks to a
user's memory:

    POST   /v1/chat/completions       one turn: the last message is the user's new one, stored with
                                      its reply exactly as on the page (Chat.reply, the same inference
                                      loop) and absorbed by the same background compression; the
                                      earlier messages are the client's recent context. stream: true
                                      sends it as server-sent events, ending with `data: [DONE]`;
                                      store: false answers without storing anything. Any model
                                      name is answered by the one model served.
    GET    /v1/models[/{id}]          the one model served: the base model with the caller's adapter
    GET    /v1/memory                 status: counts, adapter version, compression
    POST   /v1/memory/compress        compress the turns waiting, now
    GET    /v1/memory/messages        the stored history, with the ids forgetting takes
    DELETE /v1/memory/messages/{id}   forget a message (and the reply to it)
    GET    /v1/memory/export          the zip the page's export makes
    DELETE /v1/memory                 forget everything (the account and its keys stay)
    DELETE /v1/account                delete the account and all its data

Every request carries `Authorization: Bearer <key>` with a key its user made on the Memory tab
(app/api_keys.py). Access.api_user says whose it is, and every call then goes through the same
services as the page's, as that user, who is read again there: a revoked key or a deleted account
stops working at the next request. Which adapter version answered is in the response header
X-Memchat-Adapter-Version (`none`: the base model) and in the body's `memchat` object.

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the status
its clients act on: 400 a malformed request, or one asking for what this server cannot do
(tools, images, several choices...); 401 no or a wrong key; 404 nothing of the caller's there;
409 a reply stopped unsaved because another replica answered the user's next message meanwhile
(the message is stored: not to be sent again as it is); 413 too long; 429 rate limits (the page's
per-user ones) or a turn of the same user still running, with Retry-After; 500 a fault (its
reference in the log); 503 while the model loads (the loading server answers that,
app/loading.py) or the app stops.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from adapter_core.data.conversation import Turn
from adapter_core.serving.sampling import SamplingConfig
from adapter_core.serving.scheduler import LoopStopped

from .chat import FinishedReply, HistoryMessage, ReplyOptions, ReplyStarted
from .downloads import zip_response
from .errors import (AccessDenied, AppError, Busy, Gone, InvalidInput, RateLimited, ReplyNotSaved, ServerStopping,
                     TooLong, Unavailable, as_outage, describe)
from .limits import client_address
from .memory import MemoryStatus
from .services import Services

MODEL_ID = "memchat"
"""The one model served: the base model with the adapter of whoever calls."""
ADAPTER_HEADER = "X-Memchat-Adapter-Version"
READING_THREADS_PER_ROW = 4
"""Threads reading replies per row of the inference loop's batch (see api_router)."""
STARTING_THREADS_PER_ROW = 2
"""Threads starting turns per row of the batch: a turn's first item waits, in its thread, behind
the same user's running turn (up to --turn-queue-seconds), so starts have threads of their own."""
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 4, 64
_FINISH_REASONS = {"end": "stop", "stop": "stop", "length": "length"}
_NO_STORE = {"Cache-Control": "no-store"}  # every answer is one user's own
_END = object()  # what next() gives for an ended turn


class ApiError(AppError):
    """A request this module refuses itself (its body), with the status and fields to answer it."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


# --- a chat completion request, read ------------------------------------------------------------

@dataclass(frozen=True)
class ChatRequest:
    message: str
    """The user's new message: the request's last message, stored as a page's message is."""
    options: ReplyOptions
    stream: bool
    include_usage: bool
    """stream_options.include_usage: a last chunk with the token usage before [DONE]."""


def read_chat_request(body: object, base: SamplingConfig, max_new_tokens: int) -> ChatRequest:
    """The request as Chat.reply takes it; ApiError (400) for what cannot be, or asks for what this
    server does not do. Sampling starts from `base` (the page's), so that a client that says
    nothing gets the replies the page gets; max_tokens above the server's cap (`max_new_tokens`)
    is lowered to it (finish_reason then says `length`). `store: false` answers without storing
    the turn (a client's background requests: titles, tags). Fields that change nothing a client
    could rely on are accepted and ignored (user, metadata, penalties...)."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"'model' is required: this server serves '{MODEL_ID}'", param="model")
    # Any model name is taken: one model is served (the base model with the caller's adapter), and
    # many clients send a name of their own (a script's "gpt-4o-mini", a preset's). The answer's
    # `model` says which one answered.
    _refuse_unsupported(body)
    message, context, instructions = _messages(body.get("messages"))
    stream = _optional(body, "stream", bool, False)
    stream_options = _optional(body, "stream_options", dict, {})
    include_usage = stream_options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", param="stream_options")
    store = _optional(body, "store", bool, True)
    return ChatRequest(message, ReplyOptions(context=context, instructions=instructions,
                                             sampling=_sampling(body, base, max_new_tokens),
                                             seed=_seed(body), stop=_stop(body), store=store, queue=True),
                       stream, include_usage)


def _refuse_unsupported(body: dict) -> None:
    """Fields whose use a client relies on and this server cannot honour: refused, not ignored."""
    unsupported = {
        "tools": "tools (function calling)", "functions": "functions (function calling)",
        "audio": "audio output", "prediction": "predicted outputs", "web_search_options": "web search",
    }
    for field, what in unsupported.items():
        if body.get(field):
            raise ApiError(400, f"This server does not support {what}", param=field, code="unsupported_parameter")
    if body.get("function_call") not in (None, "none"):
        raise ApiError(400, "This server does not support function calling", param="function_call",
                       code="unsupported_parameter")
    if body.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "This server does not support tools", param="tool_choice", code="unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "This server writes one choice per request: 'n' must be 1", param="n",
                       code="unsupported_value")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "This server does not return log probabilities", param="logprobs",
                       code="unsupported_parameter")
    if body.get("logit_bias"):
        raise ApiError(400, "This server does not support logit_bias", param="logit_bias",
                       code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "This server writes plain text only: 'response_format' must be {\"type\": \"text\"}",
                       param="response_format", code="unsupported_value")
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise ApiError(400, "This server writes text only: 'modalities' must be [\"text\"]", param="modalities",
                       code="unsupported_value")


def _messages(messages: object) -> tuple[str, tuple[Turn, ...] | None, str | None]:
    """(the new user message, the earlier user and assistant turns or None, the system text or None)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", param="messages")
    turns, instructions, new = [], [], ""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise ApiError(400, f"{where}: this server does not support tools (function calling)", param=where,
                           code="unsupported_parameter")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be 'system', 'developer', 'user' or 'assistant', not "
                                f"{_shown(role)}", param=f"{where}.role")
        text = _content(message.get("content"), f"{where}.content", empty_ok=role == "assistant")
        if i == len(messages) - 1:
            if role != "user":
                raise ApiError(400, "The last message must be the user's new message (role 'user')",
                               param="messages")
            new = text  # as sent: an empty one is refused as the page refuses it (Chat.check_message)
        elif role in ("system", "developer"):
            instructions.append(text)
        elif text.strip():  # an empty message adds nothing to a prompt
            turns.append(Turn(role, text))
    # no earlier turns: the stored turns the adapter lacks fill the prompt, as on the page
    return new, tuple(turns) or None, "\n\n".join(t for t in instructions if t.strip()) or None


def _content(content: object, where: str, *, empty_ok: bool) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines); other parts (images,
    audio, files) are refused."""
    if content is None and empty_ok:
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where}[{j}]: this server reads text only, not {_shown(kind)}",
                               param=f"{where}[{j}]", code="unsupported_value")
            text = part.get(part["type"])  # {"type": "text", "text": ...} or {"type": "refusal", "refusal": ...}
            if not isinstance(text, str):
                raise ApiError(400, f"{where}[{j}].{part['type']} must be a string", param=f"{where}[{j}]")
            texts.append(text)
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{where} must be a string or a list of text parts", param=where)
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, which JSON's \ud800 escapes can carry
        raise ApiError(400, f"{where} is not valid Unicode (lone surrogate at position {e.start})",
                       param=where, code="invalid_value") from None
    if "\x00" in content:
        raise ApiError(400, f"{where} contains a NUL character", param=where, code="invalid_value")
    return content


def _sampling(body: dict, base: SamplingConfig, max_new_tokens: int) -> SamplingConfig:
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    for field in ("presence_penalty", "frequency_penalty"):  # accepted, not applied: see the README
        _number(body, field, -2, 2)
    limit = asked_limit = base.max_new_tokens  # what the page's replies get, unless the client asks
    for field in ("max_tokens", "max_completion_tokens"):
        asked = _optional(body, field, int, None)
        if asked is not None:
            if asked < 1:
                raise ApiError(400, f"'{field}' must be at least 1", param=field, code="invalid_value")
            limit, asked_limit = min(max_new_tokens, asked), asked
    # min_tokens: vLLM's extension, which benchmarks use for replies of one length (the end of turn
    # is held back until then); like max_tokens, capped by the server's limit rather than refused
    least = _optional(body, "min_tokens", int, None)
    if least is not None and not 0 <= least <= asked_limit:
        raise ApiError(400, f"'min_tokens' must be from 0 to max_tokens ({asked_limit})", param="min_tokens",
                       code="invalid_value")
    least = base.min_new_tokens if least is None else least
    # ignore_eos: vLLM's and llama.cpp's server's name for the same (the end of turn never ends the
    # reply), so that one benchmark client gets replies of one length from either server
    if _optional(body, "ignore_eos", bool, False):
        least = limit
    sampling = replace(base, max_new_tokens=limit, min_new_tokens=min(least, limit))
    if temperature == 0 or top_p == 0:  # the client asks for the likeliest reply (greedy, deterministic)
        return replace(sampling, do_sample=False)
    if temperature is not None:
        sampling = replace(sampling, do_sample=True, temperature=temperature)
    if top_p is not None:
        sampling = replace(sampling, top_p=top_p)
    return sampling


def _seed(body: dict) -> int | None:
    seed = _optional(body, "seed", int, None)
    if seed is not None and not -2**63 <= seed < 2**64:
        raise ApiError(400, "'seed' must be a 64-bit integer", param="seed", code="invalid_value")
    return seed


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    sequences = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(sequences, list) or len(sequences) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in sequences)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty "
                            f"strings of at most {MAX_STOP_CHARS} characters", param="stop", code="invalid_value")
    return tuple(dict.fromkeys(sequences))


def _number(body: dict, field: str, low: float, high: float) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ApiError(400, f"'{field}' must be a number from {low} to {high}", param=field, code="invalid_value")
    return float(value)


def _optional(body: dict, field: str, kind: type, default: Any) -> Any:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        words = {bool: "true or false", int: "an integer", dict: "an object"}[kind]
        raise ApiError(400, f"'{field}' must be {words}", param=field, code="invalid_type")
    return value


def _shown(value: object) -> str:
    """A value of the request inside an error message: short, and printable."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:64].encode("utf-8", "replace").decode("utf-8").replace("\n", " ")


# --- errors -------------------------------------------------------------------------------------

def error_response(error: BaseException, action: str) -> JSONResponse:
    """Any error of a request, in OpenAI's shape and status; refusals logged in one line, faults
    with their traceback (the answer then names only a reference to it)."""
    if isinstance(error, LoopStopped):  # work sent to a stopped inference loop: the server shuts down
        error = ServerStopping()
    error = as_outage(error) or error
    message = describe(error, f"API {action}")
    if isinstance(error, (ServerStopping, Unavailable)):
        return _error(503, message, "server_error", None, "unavailable", {"Retry-After": "5"})
    if isinstance(error, ApiError):
        return _error(error.status, message, error.kind, error.param, error.code)
    if isinstance(error, RateLimited):
        return _error(429, message, "requests", None, "rate_limit_exceeded",
                      {"Retry-After": str(error.retry_after_s)})
    if isinstance(error, Busy):
        return _error(429, message, "requests", None, "turn_in_progress", {"Retry-After": "1"})
    if isinstance(error, ReplyNotSaved):  # the message is stored: sent again, it would be twice
        return _error(409, message, "invalid_request_error", None, "reply_not_saved")
    if isinstance(error, AccessDenied):
        if message == "Please log in.":  # the key's account was deleted after the key was checked
            message = "Invalid API key: its account was deleted."
        return _error(401, message, "invalid_request_error", None, "invalid_api_key",
                      {"WWW-Authenticate": "Bearer"})
    if isinstance(error, InvalidInput):
        param = "messages" if error.field in ("text", "instructions") else error.field
        if isinstance(error, TooLong):
            return _error(413, message, "invalid_request_error", param, "context_length_exceeded")
        return _error(400, message, "invalid_request_error", param, "invalid_value")
    if isinstance(error, Gone):
        return _error(404, message, "invalid_request_error", None, "not_found")
    if isinstance(error, AppError):
        return _error(400, message, "invalid_request_error", None, None)
    return _error(500, message, "server_error", None, None)


def _error(status: int, message: str, kind: str, param: str | None, code: str | None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, kind, param, code), status_code=status,
                        headers=_NO_STORE | (headers or {}))


def _error_body(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _answering(action: str) -> Callable:
    """A plain endpoint whose every error is answered by error_response (FastAPI runs it in its
    thread pool: the services block on the database)."""
    def wrap(endpoint: Callable[..., Response | dict]) -> Callable[..., Response]:
        @functools.wraps(endpoint)
        def answer(*args, **kwargs) -> Response:
            try:
                result = endpoint(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - error_response logs faults with their traceback
                return error_response(e, action)
            return result if isinstance(result, Response) else JSONResponse(result, headers=_NO_STORE)
        return answer
    return wrap


def bearer_key(request: Request) -> str | None:
    """The key of `Authorization: Bearer <key>`; None without one."""
    scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


# --- JSON of the answers --------------------------------------------------------------------------

def _unix(moment) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _status_json(status: MemoryStatus) -> dict:
    job = status.job
    return {
        "object": "memory.status", "messages": status.messages, "absorbed_messages": status.absorbed_messages,
        "absorbed_tokens": status.absorbed_tokens, "pending_messages": status.pending_messages,
        "pending_tokens": status.pending_tokens, "adapter_version": status.adapter_version,
        "last_compression": _unix(status.last_compression), "needs_rebuild": status.needs_rebuild,
        # why an attempt failed is for the people who run the server (the admin page shows it)
        "compression": None if job is None else {
            "status": job.status, "attempts": job.attempts, "last_attempt_failed": job.error is not None,
            "not_before": _unix(job.not_before)},
    }


def _message_json(message: HistoryMessage) -> dict:
    return {"id": message.id, "object": "memory.message", "role": message.role, "content": message.text,
            "absorbed": message.absorbed, "created_at": _unix(message.created_at)}


def _model_json(created: int) -> dict:
    return {"id": MODEL_ID, "object": "model", "created": created, "owned_by": "memchat"}


# --- the routes -----------------------------------------------------------------------------------

def api_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/v1")
    created = int(time.time())
    # the threads that read replies as they are decoded, apart from the pool of FastAPI and Gradio
    # (whose work must not wait behind replies); made at the first request, inside the event loop.
    # A reply waiting for a place in the loop's batch holds its thread until its first token, so
    # there are several times as many threads as the batch has rows: with only as many, requests
    # queued in the loop could hold them all and freeze the chunks of the replies being decoded.
    # A turn's first item (its wait behind the user's running turn, its message stored, its reply
    # submitted) is read by threads of another limiter: turns waiting their user's turn never take
    # the threads that running replies read their chunks with.
    reply_threads: list[anyio.CapacityLimiter] = []  # [reading, starting]

    def user_of(request: Request) -> int:
        user_id = services.api_keys.whose(bearer_key(request), client_address(request))
        request.state.user_id = user_id  # for the access log (app/server.py's AccessLog)
        return user_id

    async def step(turn: Iterator, first: bool = False) -> object:
        """The turn's next item, read in a thread (it blocks on the database and on decoding)."""
        if not reply_threads:
            rows = services.chat.loop.max_rows
            reply_threads.extend([anyio.CapacityLimiter(READING_THREADS_PER_ROW * rows),
                                  anyio.CapacityLimiter(STARTING_THREADS_PER_ROW * rows)])
        # not abandoned on cancellation: a cancelled request waits for this one item (one decode
        # step at most; the first item: the user's running turn, at most --turn-queue-seconds),
        # then closes the turn, which cancels the decoding
        return await anyio.to_thread.run_sync(next, turn, _END, limiter=reply_threads[1 if first else 0])

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        turn = None
        try:
            user_id = await anyio.to_thread.run_sync(user_of, request)
            asked = read_chat_request(await _json_body(request), services.chat.sampling,
                                      services.settings.max_new_tokens)
            turn = services.chat.reply(user_id, asked.message, announce=True, options=asked.options)
            started = await step(turn, first=True)  # the message stored, the reply submitted; refusals come before
            if not isinstance(started, ReplyStarted):
                raise RuntimeError(f"a turn began with {type(started).__name__}, not ReplyStarted")
        except Exception as e:  # noqa: BLE001 - error_response logs faults with their traceback
            if turn is not None:
                turn.close()
            return error_response(e, "chat")
        completion = Completion(f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), started)
        headers = _NO_STORE | {ADAPTER_HEADER: completion.adapter}
        if asked.stream:
            # the events close the turn when they end; the background task closes it too should the
            # client be gone before the first event (the events would then never start)
            return StreamingResponse(completion.events(turn, step, asked.include_usage), headers=headers,
                                     media_type="text/event-stream", background=BackgroundTask(turn.close))
        try:
            finished = None
            while (item := await step(turn)) is not _END:
                if isinstance(item, FinishedReply):
                    finished = item
                elif await request.is_disconnected():  # nobody to answer: stop decoding
                    return Response(status_code=499)
            return JSONResponse(completion.whole(finished), headers=headers)
        except Exception as e:  # noqa: BLE001
            return error_response(e, "chat")
        finally:
            turn.close()  # when it ended early: cancels the decoding, lets the user's next turn in

    @router.get("/models")
    @_answering("models")
    def models(request: Request) -> dict:
        user_of(request)
        return {"object": "list", "data": [_model_json(created)]}

    @router.get("/models/{model_id:path}")
    @_answering("model")
    def model(model_id: str, request: Request) -> dict:
        """Any name: chat completions take any model name (one model answers them all), so a client
        that checks its model here before chatting must hear the same."""
        user_of(request)
        if not model_id or len(model_id) > 200:
            raise ApiError(404, "No such model", param="model", code="model_not_found")
        return {**_model_json(created), "id": model_id}

    @router.get("/memory")
    @_answering("memory status")
    def memory_status(request: Request) -> dict:
        return _status_json(services.memory.status(user_of(request)))

    @router.post("/memory/compress")
    @_answering("compress now")
    def compress(request: Request) -> Response:
        services.memory.compress_now(user_of(request))
        return JSONResponse({"object": "memory.compression", "queued": True}, status_code=202, headers=_NO_STORE)

    @router.get("/memory/messages")
    @_answering("history")
    def messages(request: Request) -> dict:
        return {"object": "list", "data": [_message_json(m) for m in services.chat.history(user_of(request))]}

    @router.delete("/memory/messages/{message_id}")
    @_answering("forget")
    def forget(message_id: str, request: Request) -> dict:
        deleted = services.memory.forget(user_of(request), message_id)
        return {"object": "memory.message.deleted", "id": int(message_id), "deleted": deleted}

    @router.get("/memory/export")
    @_answering("export")
    def export(request: Request) -> Response:
        user_id, address = user_of(request), client_address(request)
        download = services.exports.my_data(user_id, address).download
        found = services.downloads.find(download.token, address, services.accounts.exists)
        if found is None:  # the account was deleted meanwhile
            raise AccessDenied("Please log in")
        services.downloads.discard(download.token)  # handed over here: no link to keep
        return zip_response(*found)

    @router.delete("/memory")
    @_answering("forget everything")
    def forget_everything(request: Request) -> dict:
        services.memory.forget_everything(user_of(request))
        return {"object": "memory.deleted", "deleted": True}

    @router.delete("/account")
    @_answering("delete account")
    def delete_account(request: Request) -> dict:
        username = services.accounts.delete_own(user_of(request))
        return {"object": "account.deleted", "username": username, "deleted": True}

    # Anything else under /v1 is answered here in the API's shape, not by the page mounted at /.
    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                      include_in_schema=False)
    def unknown(path: str, request: Request) -> Response:
        return _error(404, f"Unknown endpoint: {request.method} /v1/{_shown(path)}", "invalid_request_error",
                      None, "unknown_url")

    return router


async def _json_body(request: Request) -> object:
    try:
        raw = await request.body()
    except ClientDisconnect:  # RequestGuard cut a body that grew past its cap (or the client left)
        raise ApiError(413, "Request too large", code="request_too_large") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise ApiError(400, "The request body is not valid JSON") from None


@dataclass(frozen=True)
class Completion:
    """One chat completion's answer, whole or as chunks."""

    id: str
    created: int
    started: ReplyStarted

    @property
    def adapter(self) -> str:
        """The adapter version that answers, as the response header says it."""
        version = self.started.adapter_version
        return "none" if version is None else str(version)

    def _memchat(self, finished: FinishedReply | None = None) -> dict:
        extra = {"adapter_version": self.started.adapter_version}
        if finished is not None:
            extra |= {"pending_turns": finished.stats.pending_turns, "stored": finished.stored}
        return extra

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": MODEL_ID, "system_fingerprint": None}

    @staticmethod
    def _usage(finished: FinishedReply) -> dict:
        prompt, completion = finished.stats.prompt_tokens, finished.stats.generated_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, finished: FinishedReply) -> dict:
        """The non-streamed answer: the reply as stored (what the history holds from now on)."""
        return self._head("chat.completion") | {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": finished.text, "refusal": None},
                         "logprobs": None, "finish_reason": _FINISH_REASONS[finished.stats.finish]}],
            "usage": self._usage(finished), "memchat": self._memchat(finished)}

    def _chunk(self, choices: list, **extra) -> str:
        return f"data: {json.dumps(self._head('chat.completion.chunk') | {'choices': choices} | extra)}\n\n"

    async def events(self, turn: Iterator, step: Callable, include_usage: bool) -> AsyncIterator[str]:
        """The streamed answer: a chunk with the role, one per piece of text, one with the finish
        reason (and the usage, if asked for), then [DONE]. A fault after the first chunk ends the
        stream with an error event in OpenAI's shape (the status was sent already). A client that
        goes away cancels this (Starlette) and so the decoding (the finally)."""
        usage = {"usage": None} if include_usage else {}
        try:
            yield self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}], **usage)
            finished = None
            while (item := await step(turn)) is not _END:
                if isinstance(item, FinishedReply):
                    finished = item
                elif item:
                    yield self._chunk([{"index": 0, "delta": {"content": item}, "logprobs": None,
                                        "finish_reason": None}], **usage)
            yield self._chunk([{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": _FINISH_REASONS[finished.stats.finish]}],
                              memchat=self._memchat(finished), **usage)
            if include_usage:
                yield self._chunk([], usage=self._usage(finished))
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - error_response logs it
            yield f"data: {json.dumps(json.loads(error_response(e, 'chat').body))}\n\n"
        finally:
            turn.close()
