"""Simulated users chatting at once through gradio_client against a live app on loopback.

MEMCHAT_LOAD_USERS (default 20) users each send MEMCHAT_LOAD_REQUESTS (default 3) messages and
read their memory panel; every request must succeed. Prints p50 and p95 latency."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from tests.app.helpers import Visitor


def test_many_users_chat_at_once_without_errors(running, password):
    users = int(os.environ.get("MEMCHAT_LOAD_USERS", "20"))
    requests = int(os.environ.get("MEMCHAT_LOAD_REQUESTS", "3"))

    signups: list[float] = []

    def session(i: int) -> tuple[list[float], list[str]]:
        latencies, errors = [], []
        visitor, step = Visitor(running), "sign up"
        try:
            started = time.perf_counter()
            visitor.call("signup", f"loaduser{i}", password)
            signups.append(time.perf_counter() - started)
            step = "chat"
            for r in range(requests):
                started = time.perf_counter()
                page = visitor.call("chat", f"User {i} says hello, message {r}.")
                latencies.append(time.perf_counter() - started)
                if "prompt tokens" not in page["reply-stats"] or len(page["chatbot"]) != 2 * (r + 1):
                    errors.append(f"user {i} request {r}: unexpected answer {page['chat-notice']!r}")
            step = "memory panel"
            if "**In memory**" not in visitor.call("memory")["memory-status"]:
                errors.append(f"user {i}: no memory panel")
        except Exception as e:  # every failure counts, whatever its kind
            errors.append(f"user {i} at {step}: {type(e).__name__}: {e}")
        finally:
            visitor.client.close()
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=users) as pool:
        outcomes = list(pool.map(session, range(users), timeout=600))
    wall = time.perf_counter() - started
    latencies = sorted(t for lat, _ in outcomes for t in lat)
    errors = [e for _, errs in outcomes for e in errs]
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(f"\n{users} users x {requests} chats: {len(latencies)} replies in {wall:.1f} s, "
          f"p50 {p50:.2f} s, p95 {p95:.2f} s, {len(errors)} errors; "
          f"sign-ups p50 {statistics.median(signups):.2f} s, slowest {max(signups):.2f} s")
    assert errors == []
    assert len(latencies) == users * requests
    stored = {u.username for u in running.services.storage.list_users()}
    assert all(f"loaduser{i}" in stored for i in range(users))
