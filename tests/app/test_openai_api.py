"""The OpenAI-compatible API (app/openai_api.py) over loopback, with the real `openai` package as the
client where a client would use it, and httpx for the memory endpoints and raw protocol checks."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from dataclasses import replace

import httpx
import openai
import pytest

from adapter_core.data.conversation import prompt_ids
from adapter_core.serving.decoding import ReplyRequest, reply
from app.chat import _printable
from app.errors import ReplyNotSaved
from app.openai_api import ADAPTER_HEADER, MODEL_ID, ApiError, error_response, read_chat_request
from tests.app.helpers import FakeStream, SlowStart, Visitor, free_port, wait_for
from tests.storage.helpers import table_counts

HELLO = [{"role": "user", "content": "Hello there"}]


def sign_up(running, name: str, password: str) -> tuple[int, str]:
    """A new user and an API key of theirs."""
    user_id = running.services.accounts.sign_up(name, password).account.id
    return user_id, running.services.api_keys.create(user_id, f"{name}'s client").secret


def client(running, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "v1", api_key=key or "", max_retries=0, timeout=60)


def call(running, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, running.url + "v1/" + path, headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The error is OpenAI's shape, with the status and code given; its 'error' object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def history(running, user_id: int) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in running.services.chat.history(user_id)]


# --- chat completions --------------------------------------------------------------------------

def test_a_chat_completion_is_a_turn_stored_like_the_page_s(running, password):
    alice, key = sign_up(running, "alice", password)
    raw = client(running, key).chat.completions.with_raw_response.create(model=MODEL_ID, messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "My cat is called Tobrik."}, {"role": "assistant", "content": "Nice name!"},
        {"role": "user", "content": "What is my cat called?"}])
    completion = raw.parse()
    assert raw.headers[ADAPTER_HEADER] == "none" and raw.headers["cache-control"] == "no-store"
    answer = completion.choices[0].message
    assert completion.object == "chat.completion" and completion.model == MODEL_ID
    assert answer.role == "assistant" and answer.content and completion.choices[0].finish_reason in ("stop", "length")
    # only the new message and its reply are stored: the earlier ones are the client's own context
    assert history(running, alice) == [("user", "What is my cat called?"), ("assistant", answer.content)]
    assert completion.model_extra["memchat"] == {"adapter_version": None, "pending_turns": 3, "stored": True}
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_a_streamed_chat_completion_sends_chunks_then_done(running, password):
    alice, key = sign_up(running, "alice", password)
    chunks = list(client(running, key).chat.completions.create(
        model=MODEL_ID, messages=HELLO, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finish in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # include_usage: the last chunk
    stored = history(running, alice)
    assert stored[0] == ("user", "Hello there") and stored[1][0] == "assistant"
    assert stored[1][1].rstrip("…") in text.strip()  # as streamed, or cut at the length cap

    raw = call(running, "POST", "chat/completions", key, json={"model": MODEL_ID, "messages": HELLO, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.headers[ADAPTER_HEADER] == "none"
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # not asked for


def test_the_reply_is_the_user_s_adapter_s(running, password):
    """After compression, a greedy reply through the API is, token for token, what the engine
    answers with the user's adapter state on the same prompt, which is not what it answers without."""
    services = running.services
    alice, key = sign_up(running, "alice", password)
    api = client(running, key)
    for text in ("My cat is called Tobrik.", "I live in Quenmoor."):
        api.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": text}])
    wait_for(lambda: (s := services.memory.status(alice)).adapter_version == 1 and s.pending_messages == 0
             and s.job is None)
    question = "Where do I live?"
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": question}], temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(raw.parse())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert raw.headers[ADAPTER_HEADER] == "1"

    _, state = services.memory.usable_state(services.storage.get_user(alice))
    greedy = replace(services.chat.sampling, do_sample=False)
    prompt = prompt_ids(services.engine.tokenizer, question)  # nothing pending: the bare question
    with_adapter, without = reply(services.engine, [ReplyRequest(prompt, state, greedy),
                                                    ReplyRequest(prompt, None, greedy)])
    assert with_adapter.tokens != without.tokens  # the adapter changes the answer, so the test can tell
    assert streamed.strip() == _printable(with_adapter.text).strip()
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(with_adapter.tokens))


def test_sampling_and_length_follow_the_request(running, password):
    running.services.settings.compress_every = 100  # no adapter comes between the replies compared
    _, key = sign_up(running, "alice", password)
    api = client(running, key)
    short = api.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=2, temperature=0.7, top_p=0.5)
    assert short.usage.completion_tokens <= 2
    capped = api.chat.completions.create(model=MODEL_ID, messages=HELLO, max_completion_tokens=10_000, seed=7,
                                         user="someone", presence_penalty=0.5)  # harmless extras are ignored
    assert capped.usage.completion_tokens <= running.services.settings.max_new_tokens
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *HELLO]
    same = [api.chat.completions.create(model=MODEL_ID, messages=conversation, temperature=0.9, seed=42)
            for _ in range(2)]
    assert same[0].choices[0].message.content == same[1].choices[0].message.content  # same seed and prompt
    assert same[0].usage == same[1].usage


def test_api_replies_go_through_the_app_s_inference_loop(running, password, monkeypatch):
    """Several clients at once: every reply is submitted to the one InferenceLoop the page uses."""
    submitted, real = [], running.loop.submit
    monkeypatch.setattr(running.loop, "submit", lambda request: submitted.append(request) or real(request))
    keys = [sign_up(running, f"user{i}", password)[1] for i in range(3)]
    results = [None] * 3

    def ask(i):
        results[i] = client(running, keys[i]).chat.completions.create(model=MODEL_ID, messages=HELLO)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r.choices[0].message.content for r in results) and len(submitted) == 3


# --- keys --------------------------------------------------------------------------------------

ENDPOINTS = [("POST", "chat/completions"), ("GET", "models"), ("GET", f"models/{MODEL_ID}"), ("GET", "memory"),
             ("POST", "memory/compress"), ("GET", "memory/messages"), ("DELETE", "memory/messages/1"),
             ("GET", "memory/export"), ("DELETE", "memory"), ("DELETE", "account")]


def test_no_key_or_a_wrong_one_is_401_everywhere(running, password):
    running.services.settings.login_failures_per_address = "1000/minute"  # many wrong keys here, see below
    alice, key = sign_up(running, "alice", password)
    with pytest.raises(openai.AuthenticationError) as refused:
        client(running, "sk-mc-" + "x" * 43).chat.completions.create(model=MODEL_ID, messages=HELLO)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    for method, path in ENDPOINTS:
        for wrong in (None, "not-a-key", key[:-1] + ("x" if key[-1] != "x" else "y"), key + " extra"):
            response = call(running, method, path, wrong, json={"model": MODEL_ID, "messages": HELLO})
            assert_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
    basic = httpx.get(running.url + "v1/models", auth=("alice", password))
    assert_error(basic, 401, "invalid_api_key")
    assert history(running, alice) == [] and running.services.storage.find_user("alice") is not None


def test_a_revoked_key_or_a_deleted_user_s_key_stops_at_once(running, password):
    alice, key = sign_up(running, "alice", password)
    spare = running.services.api_keys.create(alice, "spare").secret
    api = client(running, key)
    api.models.list()
    revoked = running.services.api_keys.mine(alice)[0]
    running.services.api_keys.revoke(alice, revoked.id)
    with pytest.raises(openai.AuthenticationError):
        api.models.list()
    client(running, spare).models.list()  # the other key still works
    admin_id = running.services.storage.find_user("root").id
    running.services.admin.delete_user(admin_id, alice)
    with pytest.raises(openai.AuthenticationError):
        client(running, spare).chat.completions.create(model=MODEL_ID, messages=HELLO)


def test_wrong_keys_from_one_address_are_rate_limited(running, password):
    running.services.settings.login_failures_per_address = "3/minute"
    _, key = sign_up(running, "alice", password)
    for _ in range(3):
        assert_error(call(running, "GET", "models", "sk-mc-" + "w" * 43), 401)
    limited = call(running, "GET", "models", "sk-mc-" + "w" * 43)
    assert_error(limited, 429, "rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) > 0
    # attacker findings, point 4: wrong keys locked the right ones of the same address out for 14 minutes
    assert call(running, "GET", "models", key).status_code == 200
    assert_error(call(running, "GET", "models", "sk-mc-" + "v" * 43), 429)  # the wrong ones stay refused
    assert Visitor(running).call("login", "alice", password)["whoami"]  # the page's login is another count


def test_keys_are_made_listed_and_revoked_on_the_memory_tab(running, password):
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    page = alice.call("create_api_key", "laptop", "UTC")
    secret = page["new-key"]["value"]
    assert secret.startswith("sk-mc-") and page["new-key"]["visible"] and page["key-name"] == ""
    assert page["keys"]["data"][0][:2] == ["laptop", secret[:8] + "…" + secret[-4:]]
    assert client(running, secret).models.list().data[0].id == MODEL_ID
    page = alice.call("api_keys", "UTC")
    assert secret not in json.dumps(page["keys"]) and secret not in json.dumps(page["key-choice"])  # shown once
    [(label, key_id)] = page["key-choice"]["choices"]
    assert "laptop" in label and "last used" in label
    page = alice.call("ask_revoke_api_key", key_id)  # asked first: the key still works meanwhile
    assert "Revoke the key " + secret[:8] in page["mine-question"] and page["new-key"]["visible"]
    client(running, secret).models.list()
    page = alice.call("confirm_mine", "UTC")
    assert page["keys"]["data"] == [] and page["memory-notice"] == "" and page["mine-question"] == ""
    assert not page["new-key"]["visible"] and page["new-key"]["value"] == ""  # the copy box is cleared
    with pytest.raises(openai.AuthenticationError):
        client(running, secret).models.list()
    assert alice.call("logout")["new-key"] | {"__type__": "update"} == {"__type__": "update", "value": "",
                                                                        "visible": False}


def test_nobody_reaches_another_user_s_keys(running, password):
    _, alice_key = sign_up(running, "alice", password)
    alice_id = running.services.storage.find_user("alice").id
    [alice_key_id] = [k.id for k in running.services.api_keys.mine(alice_id)]
    bob = Visitor(running)
    bob.call("signup", "bob", password)
    assert bob.call("api_keys", "UTC")["keys"]["data"] == []
    assert "no longer exists, or is not yours" in bob.call("ask_revoke_api_key", alice_key_id)["memory-notice"]
    mallory = Visitor(running)
    mallory.call("signup", "mallory", password)
    assert mallory.call("admin_revoke_key", alice_id, alice_key_id, "UTC")["admin-notice"] == "Admins only."
    client(running, alice_key).models.list()  # still alive
    admin = Visitor(running)
    admin.call("login", "root", password)
    choices = admin.call("admin_user", alice_id, "UTC")["admin-key"]["choices"]
    assert [c[1] for c in choices] == [alice_key_id] and alice_key not in json.dumps(choices)
    assert admin.call("admin_revoke_key", alice_id, alice_key_id, "UTC")["admin-key"]["choices"] == []
    with pytest.raises(openai.AuthenticationError):
        client(running, alice_key).models.list()
    audit = running.services.storage.list_audit(target_user_id=alice_id)[0]
    assert audit.action == "revoke_api_key" and audit.actor_id == running.services.storage.find_user("root").id


# --- isolation, endpoint by endpoint -------------------------------------------------------------

def test_a_second_user_cannot_see_or_touch_the_first_user_s_memory(running, password):
    services = running.services
    alice, alice_key = sign_up(running, "alice", password)
    bob, bob_key = sign_up(running, "bob", password)
    for text in ("My secret code is ZEBRA-4821.", "Remember it."):
        client(running, alice_key).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": text}])
    wait_for(lambda: services.memory.status(alice).adapter_version == 1)
    alice_before = history(running, alice)
    alice_ids = [m.id for m in services.chat.history(alice)]

    # chat: bob's prompt holds none of alice's turns, and no adapter answers him
    raw = client(running, bob_key).chat.completions.with_raw_response.create(model=MODEL_ID, messages=HELLO)
    assert raw.headers[ADAPTER_HEADER] == "none"
    assert raw.parse().usage.prompt_tokens == len(prompt_ids(services.engine.tokenizer, "Hello there"))
    # status and history: his own only
    status = call(running, "GET", "memory", bob_key).json()
    assert (status["messages"], status["adapter_version"]) == (2, None)
    listed = call(running, "GET", "memory/messages", bob_key).json()["data"]
    assert [m["content"] for m in listed][0] == "Hello there" and "ZEBRA" not in json.dumps(listed)
    # forgetting alice's messages by id: as if they did not exist
    for message_id in alice_ids:
        assert_error(call(running, "DELETE", f"memory/messages/{message_id}", bob_key), 404, "not_found")
    # export: his own data, no adapter of anyone's
    with zipfile.ZipFile(io.BytesIO(call(running, "GET", "memory/export", bob_key).content)) as z:
        assert "ZEBRA" not in z.read("history.json").decode() and not any(n.startswith("adapter/") for n in z.namelist())
    # compress, forget everything, delete the account: his own
    assert call(running, "POST", "memory/compress", bob_key).status_code == 202
    assert call(running, "DELETE", "memory", bob_key).json()["deleted"] is True
    assert history(running, bob) == []
    assert call(running, "DELETE", "account", bob_key).json()["username"] == "bob"
    # models tells nothing of anyone; and alice has everything she had, her key still working
    assert client(running, alice_key).models.list().data[0].id == MODEL_ID
    assert history(running, alice) == alice_before and services.memory.status(alice).adapter_version == 1
    assert services.storage.find_user("bob") is None


# --- memory endpoints --------------------------------------------------------------------------

def test_memory_status_compress_forget_and_export(running, password):
    services = running.services
    services.settings.compress_every = 100  # compression only when asked for
    alice, key = sign_up(running, "alice", password)
    for text in ("My cat is called Tobrik.", "I like tea."):
        client(running, key).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": text}])
    status = call(running, "GET", "memory", key).json()
    assert status["object"] == "memory.status" and status["compression"] is None
    assert (status["messages"], status["pending_messages"], status["adapter_version"]) == (4, 4, None)

    queued = call(running, "POST", "memory/compress", key)
    assert queued.status_code == 202 and queued.json() == {"object": "memory.compression", "queued": True}
    wait_for(lambda: call(running, "GET", "memory", key).json()["adapter_version"] == 1)
    assert call(running, "GET", "memory", key).json()["absorbed_messages"] == 4

    listed = call(running, "GET", "memory/messages", key).json()["data"]
    assert [(m["role"], m["absorbed"]) for m in listed] == [("user", True), ("assistant", True)] * 2
    with zipfile.ZipFile(io.BytesIO(call(running, "GET", "memory/export", key).content)) as z:
        exported = json.loads(z.read("history.json"))
        assert "adapter/peft/adapter_config.json" in z.namelist()  # the page's zip: history + adapter
    assert [m["text"] for m in exported["messages"]] == [m["content"] for m in listed]
    assert table_counts(services.storage)["download_links"] == 0  # handed over, not kept behind a link

    forgotten = call(running, "DELETE", f"memory/messages/{listed[0]['id']}", key).json()
    assert forgotten == {"object": "memory.message.deleted", "id": listed[0]["id"], "deleted": 2}
    # The forgotten turn may still be in adapter 1: a rebuild from what is left replaces it (the worker
    # may have finished it already, so wait for the version rather than look for the flag).
    wait_for(lambda: call(running, "GET", "memory", key).json()["adapter_version"] == 2)
    rebuilt = call(running, "GET", "memory", key).json()
    assert (rebuilt["messages"], rebuilt["absorbed_messages"], rebuilt["needs_rebuild"]) == (2, 2, False)
    assert "Tobrik" not in json.dumps(call(running, "GET", "memory/messages", key).json())
    assert_error(call(running, "DELETE", "memory/messages/not-a-number", key), 404)

    assert call(running, "DELETE", "memory", key).json() == {"object": "memory.deleted", "deleted": True}
    assert call(running, "GET", "memory", key).json()["messages"] == 0
    client(running, key).models.list()  # forgetting everything keeps the account and its keys
    assert call(running, "DELETE", "account", key).json()["deleted"] is True
    assert services.storage.find_user("alice") is None
    assert_error(call(running, "GET", "memory", key), 401)


def test_costly_memory_actions_share_the_page_s_limit(running, password):
    running.services.settings.actions_per_user = "2/minute"
    _, key = sign_up(running, "alice", password)
    assert call(running, "POST", "memory/compress", key).status_code == 202
    assert call(running, "GET", "memory/export", key).status_code == 200
    limited = call(running, "POST", "memory/compress", key)
    assert_error(limited, 429, "rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) > 0


# --- errors ------------------------------------------------------------------------------------

def test_malformed_or_unsupported_requests_are_400_in_openai_s_shape(running, password):
    alice, key = sign_up(running, "alice", password)
    post = lambda body: call(running, "POST", "chat/completions", key, content=json.dumps(body))  # noqa: E731
    ok = {"model": MODEL_ID, "messages": HELLO}
    assert_error(call(running, "POST", "chat/completions", key, content=b"{not json"), 400)
    assert_error(call(running, "POST", "chat/completions", key, content=b"[" * 100_000 + b"]" * 100_000), 400)
    assert_error(post([1, 2]), 400)
    cases = {
        "model": {"messages": HELLO}, "messages": {"model": MODEL_ID}, "messages[0].role": ok | {
            "messages": [{"role": "wizard", "content": "hi"}]},
        "tools": ok | {"tools": [{"type": "function", "function": {"name": "f"}}]}, "n": ok | {"n": 2},
        "messages[0]": ok | {"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}, *HELLO]},
        "messages[0].content[1]": ok | {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
        "temperature": ok | {"temperature": 3}, "top_p": ok | {"top_p": float("nan")},
        "max_tokens": ok | {"max_tokens": 0}, "stop": ok | {"stop": ["a", "b", "c", "d", "e"]},
        "stream": ok | {"stream": "yes"}, "logprobs": ok | {"logprobs": True},
        "response_format": ok | {"response_format": {"type": "json_object"}},
    }
    for param, body in cases.items():
        error = assert_error(post(body), 400)  # NaN too: Python's json writes and reads it
        assert error["param"] == param, (param, error)
    last = ok | {"messages": [*HELLO, {"role": "assistant", "content": "Hi!"}]}
    assert "last message must be the user's" in assert_error(post(last), 400)["message"]
    lone = b'{"model": "memchat", "messages": [{"role": "assistant", "content": "\\ud800"}, ' \
           b'{"role": "user", "content": "hi"}]}'
    assert "lone surrogate" in assert_error(call(running, "POST", "chat/completions", key, content=lone), 400)[
        "message"]
    # the new message is the last one, even when it is empty: never an earlier message in its place
    for empty in ("", "   ", [], [{"type": "text", "text": ""}]):
        cut = ok | {"messages": [*HELLO, {"role": "assistant", "content": "Earlier reply"},
                                 {"role": "user", "content": empty}]}
        assert "empty" in assert_error(post(cut), 400)["message"]
        assert_error(post(ok | {"messages": [{"role": "user", "content": empty}]}), 400)
    assert_error(call(running, "GET", "no/such/endpoint", key), 404, "unknown_url")
    assert history(running, alice) == []  # nothing refused was stored


def test_any_model_name_is_answered_by_the_model_served(running, password):
    alice, key = sign_up(running, "alice", password)
    answer = client(running, key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert answer.model == MODEL_ID and answer.choices[0].message.content
    assert history(running, alice)[0] == ("user", "Hello there")
    # attacker findings, point 10: the model a chat takes, /v1/models/{name} says exists (it said 404)
    assert client(running, key).models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


def test_the_page_cannot_be_framed_and_the_api_allows_no_other_origin_by_default(running, password):
    """Attacker findings, point 10: no framing headers, and CORS for /v1 neither off by choice nor configurable."""
    _, key = sign_up(running, "alice", password)
    for path in ("", "v1/models", "healthz"):
        response = httpx.get(running.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["content-security-policy"] == "frame-ancestors 'none'"
    preflight = httpx.options(running.url + "v1/chat/completions", timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_let_a_named_web_client_call_the_api(app_settings, live_text_engine, password):
    from app.launch import start
    from tests.app.conftest import FAST

    app_settings.port, app_settings.cors_origins = free_port(), "https://chat.example.org"
    running = start(app_settings, live_text_engine, FAST, block=False)
    try:
        allowed = httpx.options(running.url + "v1/chat/completions", timeout=30, headers={
            "Origin": "https://chat.example.org", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://chat.example.org"
        other = httpx.options(running.url + "v1/chat/completions", timeout=30, headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
        page = httpx.get(running.url, headers={"Origin": "https://chat.example.org"}, timeout=30)
        assert "access-control-allow-origin" not in page.headers  # the API only, never the page
    finally:
        running.close()


def test_store_false_answers_without_storing_anything(running, password, monkeypatch):
    """A client's background request (a title, tags): answered with the user's adapter and pending
    turns as a stored turn would be, counted against the same limits, but nothing is written."""
    services = running.services
    services.settings.compress_every = 100
    alice, key = sign_up(running, "alice", password)
    api = client(running, key)
    api.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "My cat is called Tobrik."}])
    before, counts = history(running, alice), services.storage.message_counts(alice)
    prompts, real = [], running.loop.submit
    monkeypatch.setattr(running.loop, "submit", lambda request: prompts.append(request.prompt) or real(request))
    title = {"role": "user", "content": "Write a title for this chat."}
    quiet = api.chat.completions.create(model=MODEL_ID, messages=[title], extra_body={"store": False})
    assert quiet.choices[0].message.content and quiet.model_extra["memchat"]["stored"] is False
    assert quiet.model_extra["memchat"]["pending_turns"] == 3  # the stored turn the adapter lacks, as stored turns get
    chunks = list(api.chat.completions.create(model=MODEL_ID, messages=[title], stream=True,
                                              extra_body={"store": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert history(running, alice) == before and services.storage.message_counts(alice) == counts
    stored = api.chat.completions.create(model=MODEL_ID, messages=[title])  # the same prompt, stored this time
    assert stored.model_extra["memchat"]["stored"] is True and prompts[0] == prompts[1] == prompts[2]
    assert len(history(running, alice)) == len(before) + 2
    assert_error(call(running, "POST", "chat/completions", key,
                      json={"model": MODEL_ID, "messages": HELLO, "store": "no"}), 400, "invalid_type")

    services.settings.messages_per_user = "1/minute"  # the page's message limit counts these too
    api.chat.completions.create(model=MODEL_ID, messages=HELLO, extra_body={"store": False})
    with pytest.raises(openai.RateLimitError):
        api.chat.completions.create(model=MODEL_ID, messages=HELLO, extra_body={"store": False})


def test_a_fault_mid_stream_ends_it_with_an_error_event(running, password, monkeypatch):
    """After the first chunk the status is sent: a fault then ends the stream with an error event in
    OpenAI's shape (no [DONE]), which the openai package raises; the user's next turn is taken."""
    alice, key = sign_up(running, "alice", password)

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away: secret detail")

    monkeypatch.setattr(running.services.storage, "finish_turn", broken)
    body = {"model": MODEL_ID, "messages": HELLO, "stream": True}
    raw = call(running, "POST", "chat/completions", key, json=body)
    assert raw.status_code == 200
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and "data: [DONE]" not in events
    error = json.loads(events[-1][6:])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert "secret detail" not in error["message"]  # a reference to the log, not the fault's text
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    with pytest.raises(openai.APIError):
        for _ in client(running, key).chat.completions.create(**body):
            pass
    monkeypatch.undo()
    client(running, key).chat.completions.create(model=MODEL_ID, messages=HELLO)  # not refused as running
    stored = history(running, alice)  # the two broken turns' messages stay without a reply, as on the page
    assert [role for role, _ in stored] == ["user", "user", "user", "assistant"]


def test_odd_unicode_is_taken_as_text(running, password):
    alice, key = sign_up(running, "alice", password)
    text = "Zero\u200bwidth, RTL \u202eevil\u202c, emoji 👩‍👩‍👧, combining e\u0301, CJK 記憶"
    api = client(running, key)
    answer = api.chat.completions.create(model=MODEL_ID, messages=[
        {"role": "system", "content": "\u202e"}, {"role": "user", "content": [{"type": "text", "text": text}]}])
    assert answer.choices[0].message.content
    assert history(running, alice)[0] == ("user", text)
    assert_error(call(running, "POST", "chat/completions", key, json={"model": MODEL_ID, "messages": [
        {"role": "user", "content": "bell\x07"}]}), 400, "invalid_value")  # stored text has no control characters


def test_too_long_is_413(running, password):
    alice, key = sign_up(running, "alice", password)
    running.services.settings.max_message_chars = 100
    long = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * 101}]}
    error = assert_error(call(running, "POST", "chat/completions", key, json=long), 413, "context_length_exceeded")
    assert "at most 100" in error["message"] and error["param"] == "messages"
    huge = {"model": MODEL_ID, "messages": [{"role": "user", "content": "y" * 300_000}]}
    assert_error(call(running, "POST", "chat/completions", key, json=huge), 413, "request_too_large")
    pieces = [b'{"a": "' + b"z" * 200_000, b"z" * 200_000]
    chunked = call(running, "POST", "chat/completions", key, content=iter(pieces))
    assert chunked.status_code == 413  # no length declared: cut where it passes the cap
    assert history(running, alice) == []


def test_what_one_request_sends_in_all_is_bounded(running, password, monkeypatch):
    """Attacker findings, point 2: a 37 KiB system message (7,735 tokens) was answered in 60 s, and
    5,800 tiny earlier turns held the server for 20 s. The prompt in all (system text, earlier turns,
    message) has at most max_prompt_tokens: instructions too long are refused with 413, earlier turns
    beyond it are dropped, earliest first, at the cost of one batched tokenization."""
    alice, key = sign_up(running, "alice", password)
    running.services.settings.max_prompt_tokens = 200
    system = {"role": "system", "content": "Always be brief. " * 60}  # over 200 tokens
    error = assert_error(call(running, "POST", "chat/completions", key, json={
        "model": MODEL_ID, "messages": [system, *HELLO]}), 413, "context_length_exceeded")
    assert "at most 200" in error["message"] and error["param"] == "messages"
    assert history(running, alice) == []

    rendered = []
    template = running.services.engine.tokenizer.apply_chat_template
    monkeypatch.setattr(running.services.engine.tokenizer, "apply_chat_template",
                        lambda messages, **kw: rendered.append(len(messages)) or template(messages, **kw))
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"t{i}"} for i in range(5_800)]
    reply = client(running, key).chat.completions.create(model=MODEL_ID, messages=[*turns, *HELLO])
    assert 0 < reply.usage.prompt_tokens <= 200
    assert max(rendered) < 200  # the template never saw the thousands of turns that could not fit


def test_rate_limits_and_a_running_turn_are_429(running, password, monkeypatch):
    alice, key = sign_up(running, "alice", password)
    running.services.settings.messages_per_user = "1/minute"
    api = client(running, key)
    api.chat.completions.create(model=MODEL_ID, messages=HELLO)
    with pytest.raises(openai.RateLimitError) as limited:
        api.chat.completions.create(model=MODEL_ID, messages=HELLO)
    assert limited.value.code == "rate_limit_exceeded" and "faster than the model" in limited.value.message
    assert int(limited.value.response.headers["retry-after"]) > 0

    running.services.settings.messages_per_user = "100/minute"
    running.services.settings.turn_queue_depth = 1
    gate, started = threading.Event(), threading.Event()
    monkeypatch.setattr(running.loop, "submit",
                        lambda request: started.set() or FakeStream(request, ["Thinking ", "slowly."], gate=gate))
    answers = []
    ask = lambda: answers.append(api.chat.completions.create(model=MODEL_ID, messages=HELLO).choices[0].message.content)
    first, second = threading.Thread(target=ask), threading.Thread(target=ask)
    first.start()
    assert started.wait(20)
    second.start()  # waits behind her running turn
    deadline = time.monotonic() + 20
    while alice not in running.services.chat._turns._waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as busy:  # her line is full
        api.chat.completions.create(model=MODEL_ID, messages=HELLO)
    assert busy.value.code == "turn_in_progress"
    gate.set()
    first.join(20), second.join(20)
    assert answers == ["Thinking slowly."] * 2

    running.services.settings.turn_queue_seconds = 0.3
    gate.clear(), started.clear()
    first = threading.Thread(target=ask)
    first.start()
    assert started.wait(20)
    with pytest.raises(openai.RateLimitError) as waited:  # her turn outlasted the wait
        api.chat.completions.create(model=MODEL_ID, messages=HELLO)
    assert waited.value.code == "turn_in_progress" and "after 0.3 s" in waited.value.message
    gate.set()
    first.join(20)


def test_three_calls_of_the_default_openai_client_with_one_key_all_succeed(running, password, monkeypatch):
    """The `openai` package sends a conversation's requests together and gives up on a 429 after
    two short retries: a key's requests wait behind its running one, answered in the order sent."""
    alice, key = sign_up(running, "alice", password)
    gate = threading.Event()
    monkeypatch.setattr(running.loop, "submit", lambda request: FakeStream(request, ["Slow ", "reply."], gate=gate))
    api = openai.OpenAI(base_url=running.url + "v1", api_key=key)  # default retries and timeout
    outcomes = []
    calls = [threading.Thread(target=lambda i=i: outcomes.append(api.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": f"question {i}"}]).choices[0].message.content))
        for i in range(3)]
    for call_ in calls:
        call_.start()
    threading.Timer(4.0, gate.set).start()  # the first reply takes 4 s, longer than the client's retries
    for call_ in calls:
        call_.join(60)
    assert outcomes == ["Slow reply."] * 3
    assert sorted(text for role, text in history(running, alice) if role == "user") == [f"question {i}" for i in range(3)]


def test_the_api_says_503_while_the_model_loads(app_settings, live_text_engine, password, monkeypatch):
    app_settings.port = free_port()
    slow = SlowStart(app_settings, live_text_engine, monkeypatch)
    url = f"http://127.0.0.1:{app_settings.port}/v1"
    try:
        wait_for(lambda: _answers(url + "/models"))
        loading = openai.OpenAI(base_url=url, api_key="sk-mc-" + "x" * 43, max_retries=0)
        with pytest.raises(openai.APIStatusError) as unavailable:
            loading.chat.completions.create(model=MODEL_ID, messages=HELLO)
        assert unavailable.value.status_code == 503 and unavailable.value.code == "model_loading"
        assert int(unavailable.value.response.headers["retry-after"]) > 0
    finally:
        running = slow.release()
    try:
        with pytest.raises(openai.AuthenticationError):  # the real API answers now
            loading.models.list()
    finally:
        running.close()


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        return False
    return True


# --- a client that goes away ----------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_cancels_its_reply(running, password, monkeypatch, stream):
    """The reply stops decoding (its stream is cancelled), nothing of it is stored, and the user's
    next turn is taken at once."""
    alice, key = sign_up(running, "alice", password)
    services = running.services
    services.chat.sampling = replace(services.chat.sampling, max_new_tokens=800, min_new_tokens=800)
    streams, real = [], running.loop.submit
    monkeypatch.setattr(running.loop, "submit", lambda request: streams.append(real(request)) or streams[-1])
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell me a long story"}], "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    if stream:
        with httpx.stream("POST", running.url + "v1/chat/completions", json=body, headers=headers,
                          timeout=60) as response:
            assert next(response.iter_lines()).startswith("data: ")  # the reply is under way
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
            httpx.post(running.url + "v1/chat/completions", json=body, headers=headers,
                       timeout=httpx.Timeout(60, read=0.5))
    ended = streams[0].result(timeout=20)
    assert ended.finish == "cancelled" and len(ended.tokens) < 800
    wait_for(lambda: history(running, alice) == [("user", "Tell me a long story")])
    services.chat.sampling = replace(services.chat.sampling, max_new_tokens=6, min_new_tokens=0)
    client(running, key).chat.completions.create(model=MODEL_ID, messages=HELLO)  # not refused as still running
    assert len(history(running, alice)) == 3


# --- reading a request (no server) -------------------------------------------------------------

def test_a_request_is_read_into_a_turn_and_its_options():
    from adapter_core.serving.sampling import SamplingConfig
    base = SamplingConfig(max_new_tokens=50)
    asked = read_chat_request({"model": MODEL_ID, "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": None}, {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four"}]}],
        "temperature": 0, "max_tokens": 500, "stop": "END", "seed": 3, "stream": True,
        "stream_options": {"include_usage": True}, "user": "ignored", "metadata": {"x": 1}}, base, 50)
    options = asked.options
    assert asked.message == "three\nfour" and asked.stream and asked.include_usage
    assert [(t.role, t.text) for t in options.context] == [("user", "one"), ("assistant", "two")]
    assert options.instructions == "Be brief.\n\nBe kind." and options.stop == ("END",) and options.seed == 3
    assert options.sampling == replace(base, do_sample=False)  # temperature 0: greedy; max_tokens capped at 50
    plain = read_chat_request({"model": MODEL_ID, "messages": HELLO}, base, 50)
    assert plain.options.sampling == base and plain.options.instructions is None
    assert plain.options.context is None  # the stored turns the adapter lacks, as on the page
    warm = read_chat_request({"model": MODEL_ID, "messages": HELLO, "temperature": 1.5, "top_p": 0.5,
                              "max_completion_tokens": 7}, replace(base, do_sample=False), 50)
    assert warm.options.sampling == replace(base, temperature=1.5, top_p=0.5, max_new_tokens=7)
    assert plain.options.store and not read_chat_request(
        {"model": "gpt-4o", "messages": HELLO, "store": False}, base, 50).options.store
    skipped = read_chat_request({"model": MODEL_ID, "messages": [
        {"role": "user", "content": "  "}, {"role": "assistant", "content": "one"}, {"role": "user", "content": ""}]},
        base, 50)
    assert skipped.message == "" and [(t.role, t.text) for t in skipped.options.context] == [("assistant", "one")]
    with pytest.raises(ApiError, match="'seed' must be a 64-bit integer"):
        read_chat_request({"model": MODEL_ID, "messages": HELLO, "seed": 2**64}, base, 50)
    with pytest.raises(ApiError, match="'max_tokens' must be an integer"):
        read_chat_request({"model": MODEL_ID, "messages": HELLO, "max_tokens": True}, base, 50)
    fixed = read_chat_request({"model": MODEL_ID, "messages": HELLO, "max_tokens": 20, "min_tokens": 20}, base, 50)
    assert fixed.options.sampling == replace(base, max_new_tokens=20, min_new_tokens=20)
    capped = read_chat_request({"model": MODEL_ID, "messages": HELLO, "max_tokens": 80, "min_tokens": 80}, base, 50)
    assert capped.options.sampling == replace(base, max_new_tokens=50, min_new_tokens=50)  # as max_tokens is
    for least in (21, -1, 2.5):
        with pytest.raises(ApiError, match="'min_tokens' must be"):
            read_chat_request({"model": MODEL_ID, "messages": HELLO, "max_tokens": 20, "min_tokens": least}, base, 50)
    ignoring = read_chat_request({"model": MODEL_ID, "messages": HELLO, "max_tokens": 30, "ignore_eos": True}, base, 50)
    assert ignoring.options.sampling == replace(base, max_new_tokens=30, min_new_tokens=30)  # llama-server's name
    assert read_chat_request({"model": MODEL_ID, "messages": HELLO, "ignore_eos": True}, base, 50).options.sampling \
        == replace(base, min_new_tokens=base.max_new_tokens)
    with pytest.raises(ApiError, match="'ignore_eos' must be"):
        read_chat_request({"model": MODEL_ID, "messages": HELLO, "ignore_eos": "yes"}, base, 50)


def test_deleting_the_account_while_its_reply_streams_ends_the_stream_cleanly(running, password, monkeypatch,
                                                                               caplog):
    """Attacker findings, point 7: the end of the turn found no account and logged a traceback."""
    alice, key = sign_up(running, "alice", password)
    gate, started = threading.Event(), threading.Event()
    monkeypatch.setattr(running.loop, "submit",
                        lambda request: started.set() or FakeStream(request, ["Thinking ", "slowly."], gate=gate))
    other = openai.OpenAI(base_url=running.url + "v1", api_key=sign_up(running, "bob", password)[1], max_retries=0)
    chunks = iter(client(running, key).chat.completions.create(model=MODEL_ID, messages=HELLO, stream=True))
    next(chunks)
    assert started.wait(20)
    with caplog.at_level("INFO"):
        assert call(running, "DELETE", "account", key).status_code == 200
        gate.set()
        with pytest.raises(openai.APIError) as ended:
            for _ in chunks:
                pass
    assert "deleted" in ended.value.message
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert other.models.list().data  # the server carries on


def test_a_reply_stopped_unsaved_is_409_and_not_to_be_retried():
    """A reply another replica's answer made unsavable: the message is stored, so the client is not
    told to send it again (429 and Retry-After would make OpenAI's SDK resend it: stored twice)."""
    answer = error_response(ReplyNotSaved("This reply could not be saved"), "chat")
    error = json.loads(answer.body)["error"]
    assert answer.status_code == 409 and "retry-after" not in answer.headers
    assert (error["code"], error["type"]) == ("reply_not_saved", "invalid_request_error")
