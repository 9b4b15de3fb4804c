"""Hostile input through the services and over HTTP: a clear refusal or safe handling, the app
keeps serving, and nothing stored changes when input is refused."""

from __future__ import annotations

import json

import httpx
import pytest

from app.errors import InvalidInput
from app.server import MAX_BODY_BYTES
from tests.app.helpers import Visitor, chat
from tests.reliability.corpus import ACCEPT, HOSTILE, REJECT
from tests.storage.helpers import table_counts

IDS = [name for name, _, _ in HOSTILE]


def test_the_corpus_is_large_and_varied():
    assert len(HOSTILE) >= 30
    assert {outcome for _, _, outcome in HOSTILE} == {ACCEPT, REJECT}


@pytest.mark.parametrize("name, text, outcome", HOSTILE, ids=IDS)
def test_chat_messages_through_the_services(services, password, name, text, outcome):
    bob = services.accounts.sign_up("bob", password).account.id
    chat(services, bob, "My secret is 4821-ZEBRA.")
    alice = services.accounts.sign_up("alice", password).account.id
    before = table_counts(services.storage)
    if outcome == REJECT:
        with pytest.raises(InvalidInput) as refused:
            chat(services, alice, text)
        assert refused.value.field == "text" and str(refused.value).startswith("The message ")
        assert table_counts(services.storage) == before
    else:
        streamed, finished = chat(services, alice, text)
        stored = services.chat.history(alice)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert stored[0].text == text.replace("\r\n", "\n").replace("\r", "\n")
        assert "4821-ZEBRA" not in streamed + stored[1].text  # nothing of bob's can reach alice
    _, finished = chat(services, alice, "still there?")  # the services keep serving
    assert finished.stats.reply_tokens > 0


@pytest.mark.parametrize("name, text, _outcome", HOSTILE, ids=IDS)
def test_the_same_text_as_a_username_or_password(services, password, name, text, _outcome):
    before = table_counts(services.storage)
    try:
        user_id = services.accounts.sign_up(text, password).account.id
    except InvalidInput as e:
        assert e.field == "username" and str(e).startswith("The username ")
        after = table_counts(services.storage)
        assert after.pop("audit_log") == before.pop("audit_log") + 1  # the refusal is audited, nothing else
        assert after == before
    else:
        assert services.accounts.log_in(text, password).account.id == user_id
    try:
        services.accounts.sign_up(f"user{len(name)}x{abs(hash(name)) % 1000}", text)
    except InvalidInput as e:
        assert e.field == "password"


def test_hostile_input_over_http_leaves_the_app_serving(running, password, monkeypatch):
    # httpx writes raw UTF-8, which cannot hold a lone surrogate; any client may send it as a JSON
    # escape (\ud800) instead, so do that.
    import httpx._content
    monkeypatch.setattr(httpx._content, "json_dumps", lambda obj, **kw: json.dumps(obj, **(kw | {"ensure_ascii": True})))
    alice = Visitor(running)
    alice.call("signup", "alice", password)
    counts = []
    for name, text, outcome in HOSTILE:
        before = table_counts(running.services.storage)
        if len(json.dumps(text)) > MAX_BODY_BYTES:  # refused by the server before anything reads it
            with pytest.raises(httpx.HTTPStatusError, match="413"):
                alice.call("chat", text)
            assert outcome == REJECT and table_counts(running.services.storage) == before, name
            continue
        page = alice.call("chat", text)
        if outcome == REJECT:
            assert page["chat-notice"].startswith("The message "), name  # words for people, no traceback
            assert table_counts(running.services.storage) == before, name
        else:
            assert page["chat-notice"] == "", name
            counts.append(name)
        refused = Visitor(running).call("login", text, password)["login-notice"]  # no such account
        assert refused.startswith(("Wrong username or password", "Too many failed logins")), name
    assert len(counts) == sum(outcome == ACCEPT for _, _, outcome in HOSTILE)
    stored = [m.text for m in running.services.chat.history(running.services.storage.find_user("alice").id)
              if m.role == "user"]
    expected = [t.replace("\r\n", "\n").replace("\r", "\n") for _, t, o in HOSTILE if o == ACCEPT]
    assert stored == expected  # every accepted text stored exactly once, as typed
    assert "prompt tokens" in alice.call("chat", "a normal message after all that")["reply-stats"]
