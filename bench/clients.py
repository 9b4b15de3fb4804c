"""Programs acting as users over HTTP, for the sections that drive servers as their clients would
(bench.replicas, bench.serving): the OpenAI SDK's streamed chat completions, timed, many at once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import openai

WAIT_S = 600.0
"""Longest wait for anything here: a process to start, a compression, a reply."""


class ApiUser:
    """One user's client: the SDK's, on an HTTP client whose cookie jar (as the SDK's own would) keeps
    the user on the replica a load balancer's cookie names."""

    def __init__(self, url: str, key: str) -> None:
        """url: the server's root (its API under url + "v1"); key: the user's API key."""
        self.http = httpx.Client(timeout=WAIT_S)
        self.api = openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0, http_client=self.http)

    def close(self) -> None:
        self.http.close()


@dataclass(frozen=True)
class StreamedReply:
    first_token_s: float
    """From sending the request to the first piece of text."""
    total_s: float
    """From sending the request to the stream's end."""
    prompt_tokens: int
    tokens: int
    headers: httpx.Headers


def streamed_reply(user: ApiUser, messages: list[dict], tokens: int, model: str,
                   extra: dict | None = None) -> StreamedReply:
    """One chat completion, streamed, greedy, of exactly `tokens` tokens (ignore_eos: vLLM's and
    llama-server's name, which the app's API takes too), timed from the request; `extra`: more of
    the request's fields."""
    started, first, usage = time.perf_counter(), None, None
    raw = user.api.chat.completions.with_raw_response.create(
        model=model, messages=messages, stream=True, temperature=0, max_tokens=tokens,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **(extra or {})})
    for chunk in raw.parse():
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        usage = chunk.usage or usage
    total = time.perf_counter() - started
    if first is None or usage is None:
        raise RuntimeError(f"a reply without text or usage to {messages[-1]['content']!r}")
    return StreamedReply(first, total, usage.prompt_tokens, usage.completion_tokens, raw.headers)


def at_once(users: list, work) -> tuple[list, float]:
    """work(i, user) for every user, all released at the same moment on threads of their own; what
    each returned, and the wall time. The first error of any raises here."""
    results: list = [None] * len(users)
    errors: list[BaseException] = []
    gate = threading.Barrier(len(users) + 1, timeout=WAIT_S)

    def run(i: int) -> None:
        try:
            gate.wait()
            results[i] = work(i, users[i])
        except BaseException as e:  # noqa: BLE001 - raised again on the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - started


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def compress_now(url: str, keys: list[str]) -> None:
    """Each key's user's turns compressed into an adapter, now (the app's POST /v1/memory/compress), waited for."""
    for key in keys:
        httpx.post(url + "v1/memory/compress", headers=bearer(key), timeout=WAIT_S).raise_for_status()
    deadline = time.monotonic() + WAIT_S
    for key in keys:
        while httpx.get(url + "v1/memory", headers=bearer(key), timeout=WAIT_S).json()["adapter_version"] is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no adapter after {WAIT_S:.0f} s")
            time.sleep(0.5)
