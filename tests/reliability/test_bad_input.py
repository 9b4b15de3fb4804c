"""Hostile input through the service layer and over HTTP: a clear error or safe handling, the app
keeps serving, and nothing stored changes when input is rejected."""

from __future__ import annotations

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from storage import StorageError
from tests.reliability.corpus import ACCEPT, HOSTILE, REJECT
from tests.storage.helpers import table_counts

IDS = [name for name, _, _ in HOSTILE]


def test_the_corpus_is_large_and_varied():
    assert len(HOSTILE) >= 30
    assert {outcome for _, _, outcome in HOSTILE} == {ACCEPT, REJECT}


@pytest.mark.parametrize("name, text, outcome", HOSTILE, ids=IDS)
def test_chat_messages_through_the_service(service, password, name, text, outcome):
    bob = service.sign_up("bob", password)
    list(service.reply(bob, "My secret is 4821-ZEBRA."))
    alice = service.sign_up("alice", password)
    before = table_counts(service.storage)
    if outcome == REJECT:
        with pytest.raises(StorageError, match="^text: "):
            list(service.reply(alice, text))
        assert table_counts(service.storage) == before
    else:
        *reply, stats = service.reply(alice, text)
        stored = service.history(alice)
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[0]["text"] == text.replace("\r\n", "\n").replace("\r", "\n")
        assert "4821-ZEBRA" not in "".join(reply) + stored[1]["text"]  # nothing of bob's can reach alice
    *_, stats = service.reply(alice, "still there?")  # the service keeps serving
    assert stats.reply_tokens > 0


@pytest.mark.parametrize("name, text, _outcome", HOSTILE, ids=IDS)
def test_the_same_text_as_a_username_or_password(service, password, name, text, _outcome):
    before = table_counts(service.storage)
    try:
        user_id = service.sign_up(text, password)
    except StorageError as e:
        assert str(e).startswith("username: ")
        assert table_counts(service.storage) == before
    else:
        assert service.log_in(text, password) == user_id
    try:
        service.sign_up(f"user{len(name)}x{abs(hash(name)) % 1000}", text)
    except StorageError as e:
        assert str(e).startswith("password: ")


def test_hostile_input_over_http_leaves_the_app_serving(running, password, monkeypatch):
    # httpx writes raw UTF-8, which cannot hold a lone surrogate; any client may send it as a JSON
    # escape (\ud800) instead, so do that.
    import json

    import httpx._content
    monkeypatch.setattr(httpx._content, "json_dumps", lambda obj, **kw: json.dumps(obj, **(kw | {"ensure_ascii": True})))
    alice = Client(running.url, verbose=False)
    alice.predict("alice", password, api_name="/signup")
    counts = []
    for name, text, outcome in HOSTILE:
        before = table_counts(running.service.storage)
        if outcome == REJECT:
            with pytest.raises(AppError):
                alice.predict(text, api_name="/chat")
            assert table_counts(running.service.storage) == before, name
        else:
            alice.predict(text, api_name="/chat")
            counts.append(name)
        with pytest.raises(AppError):
            Client(running.url, verbose=False).predict(text, password, api_name="/login")  # no such account
    assert len(counts) == sum(outcome == ACCEPT for _, _, outcome in HOSTILE)
    stored = [m["text"] for m in running.service.history(running.service.storage.find_user("alice").id)
              if m["role"] == "user"]
    expected = [t.replace("\r\n", "\n").replace("\r", "\n") for _, t, o in HOSTILE if o == ACCEPT]
    assert stored == expected  # every accepted text stored exactly once, as typed
    _, _, stats = alice.predict("a normal message after all that", api_name="/chat")
    assert "prompt tokens" in stats
