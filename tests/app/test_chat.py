"""Chat: one turn stored, streamed, measured; its transactions; its order per user; decoding's ends."""

import threading
import time
from dataclasses import replace

import pytest

from adapter_core.data.conversation import SYSTEM_PROMPT, Turn
from app.chat import (
    FinishedReply, OneTurnAtATime, ReplyFailed, ReplyOptions, ReplyStarted, SharedTurns, TurnOpened, _whole_sentences,
)
from app.errors import AccessDenied, AppError, Busy, InvalidInput, RateLimited, ReplyNotSaved, TooLong
from app.services import Services
from tests.app.helpers import FakeStream, chat, run_jobs, wait_for
from tests.storage.helpers import transactions


def test_messages_are_limited_in_size_and_rate(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    services.settings.max_message_chars = 50
    with pytest.raises(InvalidInput, match="The message is too long: 51 characters, at most 50"):
        chat(services, uid, "x" * 51)
    services.settings.max_message_chars = 2000
    with pytest.raises(InvalidInput, match="^The question is too long: 1,100 tokens, at most"):
        services.chat.check_message("y" * 1100, field="question")
    services.settings.messages_per_user = "2/minute"
    chat(services, uid, "one")
    chat(services, uid, "two")
    with pytest.raises(RateLimited, match="faster than the model can answer"):
        chat(services, uid, "three")
    assert [m.text for m in services.chat.history(uid) if m.role == "user"] == ["one", "two"]


def test_a_turn_is_stored_streamed_and_measured(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    streamed, finished = chat(services, uid, "Hello there")
    history = services.chat.history(uid)
    assert [m.role for m in history] == ["user", "assistant"]
    assert history[0].text == "Hello there" and not history[0].absorbed
    assert history[1].text == finished.text  # what the page shows at the end is what is stored
    # as streamed, or (cut off by the 6-token cap) up to its last whole sentence
    assert finished.text in (streamed.strip() or "…", _whole_sentences(streamed.strip()))
    stats = finished.stats
    assert stats.adapter_version is None and stats.pending_turns == 1 and stats.prompt_tokens > 0
    assert stats.total_s >= stats.first_token_s >= 0 and "prompt tokens" in stats.line()


def test_a_reply_takes_at_most_three_database_transactions(services, password):
    """Counted over the whole turn: the user check, the conversation, both messages, the snapshot,
    the pending turns and the compression job are read and written in begin_turn and finish_turn."""
    uid = services.accounts.sign_up("alice", password).account.id
    with transactions(services.storage) as first:
        chat(services, uid, "My cat is called Tobrik.")
    with transactions(services.storage) as second:  # this one queues the compression
        chat(services, uid, "I live in Quenmoor.")
    run_jobs(services)
    services.memory.drop_state(uid)  # the adapter is read from its file, not the cache
    with transactions(services.storage) as with_adapter:
        _, finished = chat(services, uid, "What is my cat called?")
    assert finished.stats.adapter_version == 1
    assert services.memory.status(uid).job is None and services.storage.active_job(uid) is None
    assert [len(first), len(second), len(with_adapter)] == [2, 2, 2]


def test_answering_without_an_adapter_shows_the_turns_it_lacks(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    services.settings.compress_every = 100
    for text in ("one", "two", "three"):
        chat(services, uid, text)
    _, finished = chat(services, uid, "four")
    assert finished.stats.pending_turns == 7  # three earlier turns of two messages, and the new one
    services.settings.recent_token_budget = 40  # older turns wait for compression instead
    _, finished = chat(services, uid, "five")
    assert 1 < finished.stats.pending_turns < 9


def test_one_user_s_turns_run_one_at_a_time(services, password, monkeypatch):
    alice = services.accounts.sign_up("alice", password).account.id
    bob = services.accounts.sign_up("bob", password).account.id
    gate, requests = threading.Event(), []

    def submit(request):
        requests.append(request)
        return FakeStream(request, [f"Answer {len(requests)}.", " Done."], gate=gate if len(requests) == 1 else None)

    monkeypatch.setattr(services.chat.loop, "submit", submit)
    first = threading.Thread(target=chat, args=(services, alice, "first"))
    first.start()
    deadline = time.monotonic() + 10
    while not requests and time.monotonic() < deadline:
        time.sleep(0.01)
    # her second message, while the first is being answered, is refused at once (it could not see
    # the first turn), and nothing of it is stored
    with pytest.raises(AppError, match="still being answered"):
        chat(services, alice, "second, too soon")
    chat(services, bob, "bob is not held up")  # another user's turn goes on meanwhile
    assert len(requests) == 2
    gate.set()
    first.join(10)
    chat(services, alice, "second")
    tok = services.engine.tokenizer
    assert "Answer 1. Done." in tok.decode(list(requests[2].prompt))  # her second reply sees her first
    assert [m.text for m in services.chat.history(alice)] == ["first", "Answer 1. Done.", "second", "Answer 3. Done."]


def test_the_page_gets_the_history_from_the_turn_itself(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "one")
    with transactions(services.storage) as used:
        items = list(services.chat.reply(uid, "two", with_history=True))
    opened, finished = items[0], items[-1]
    assert isinstance(opened, TurnOpened) and isinstance(finished, FinishedReply)
    assert [m.text for m in opened.history][::2] == ["one", "two"] and opened.history[-1].role == "user"
    assert len(used) == 2


def test_a_reply_whose_reader_goes_away_stops_decoding_and_stores_nothing(services, password, monkeypatch):
    uid = services.accounts.sign_up("alice", password).account.id
    streams = []
    monkeypatch.setattr(services.chat.loop, "submit",
                        lambda request: streams.append(FakeStream(request, ["First words ", "more"])) or streams[-1])
    replies = services.chat.reply(uid, "hi")
    assert next(replies) == "First words "
    replies.close()  # as when the person logs out or the tab closes mid-reply
    assert streams[0].cancelled.is_set()
    assert [m.role for m in services.chat.history(uid)] == ["user"]
    chat(services, uid, "the next turn is not held up")  # the turn's lock was let go


def test_a_failed_decoding_is_a_fault_not_a_stored_reply(services, password, monkeypatch):
    uid = services.accounts.sign_up("alice", password).account.id
    monkeypatch.setattr(services.chat.loop, "submit", lambda request: FakeStream(request, [], finish="failed"))
    with pytest.raises(ReplyFailed) as failed:
        chat(services, uid, "hi")
    assert not isinstance(failed.value, AppError)
    assert [m.role for m in services.chat.history(uid)] == ["user"]


def test_a_reply_is_stored_as_printable_text_and_never_empty(services, password, monkeypatch):
    uid = services.accounts.sign_up("alice", password).account.id
    replies = iter([(["Tea\x1b[31m is", " warm\x00.", " And then"], "length"), (["  "], "end")])
    monkeypatch.setattr(services.chat.loop, "submit", lambda request: FakeStream(request, *next(replies)))
    assert chat(services, uid, "one")[1].text == "Tea[31m is warm."  # cut at the length cap, at a sentence
    assert chat(services, uid, "two")[1].text == "…"


def test_nobody_chats_without_logging_in(services, password):
    for nobody in (None, "abc", 99999):
        with pytest.raises(AccessDenied, match="Please log in"):
            chat(services, nobody, "hello")
        with pytest.raises(AccessDenied):
            services.chat.history(nobody)
    assert services.storage.pending_users() == []


def test_a_reply_cut_off_by_the_cap_ends_at_its_last_whole_sentence():
    assert _whole_sentences("I like tea. It is warm! And then the") == "I like tea. It is warm!"
    assert _whole_sentences('She said "go." Then she') == 'She said "go."'
    assert _whole_sentences("no end of a sentence here") == "no end of a sentence here…"
    tail = "Hi. Then a long tail that never ends at all"
    assert _whole_sentences(tail) == tail + "…"
    assert _whole_sentences("version 1.5 is out and") == "version 1.5 is out and…"  # a dot inside a number


# --- what the API may ask of a turn (ReplyOptions) ---------------------------------------------

def test_a_stop_sequence_ends_the_reply_before_it_and_is_neither_streamed_nor_stored(services, password,
                                                                                       monkeypatch):
    uid = services.accounts.sign_up("alice", password).account.id
    streams = []

    def submit(request):
        streams.append(FakeStream(request, ["Tea is wa", "rm. ST", "OP and more", " after"]))
        return streams[-1]

    monkeypatch.setattr(services.chat.loop, "submit", submit)
    parts = list(services.chat.reply(uid, "one", options=ReplyOptions(stop=("STOP", "never"))))
    streamed, finished = "".join(p for p in parts if isinstance(p, str)), parts[-1]
    assert streamed == "Tea is warm. " and "ST" not in streamed  # "ST" was held back until it proved a stop
    assert finished.text == "Tea is warm." and finished.stats.finish == "stop" and streams[0].cancelled.is_set()
    assert services.chat.history(uid)[-1].text == "Tea is warm."
    # held back, then shown when it turns out not to be one; the stored reply is all of it
    parts = list(services.chat.reply(uid, "two", options=ReplyOptions(stop=("STOP!",))))
    assert "".join(p for p in parts if isinstance(p, str)) == "Tea is warm. STOP and more after"
    assert parts[-1].stats.finish == "end" and parts[-1].text == "Tea is warm. STOP and more after"


def test_a_client_s_context_and_instructions_make_the_prompt(services, password, monkeypatch):
    uid = services.accounts.sign_up("alice", password).account.id
    services.settings.compress_every = 100
    chat(services, uid, "stored earlier")
    requests = []
    monkeypatch.setattr(services.chat.loop, "submit",
                        lambda request: requests.append(request) or FakeStream(request, ["Fine."]))
    context = (Turn("user", "client turn one"), Turn("assistant", "client reply"))
    items = list(services.chat.reply(uid, "now", announce=True,
                                     options=ReplyOptions(context=context, instructions="Speak like a pirate.")))
    started, finished = items[0], items[-1]
    assert isinstance(started, ReplyStarted) and started.adapter_version is None
    assert started.prompt_tokens == len(requests[0].prompt) == finished.stats.prompt_tokens
    prompt = services.engine.tokenizer.decode(list(requests[0].prompt))
    assert "client turn one" in prompt and "Speak like a pirate." in prompt and SYSTEM_PROMPT in prompt
    assert "stored earlier" not in prompt  # the client's turns stand in for the stored ones
    assert finished.stats.pending_turns == 3
    list(services.chat.reply(uid, "and now"))  # the page's way: the stored turns, the app's system text
    prompt = services.engine.tokenizer.decode(list(requests[1].prompt))
    assert "stored earlier" in prompt and "client turn one" not in prompt and "pirate" not in prompt
    # only the new messages and replies were stored
    assert [m.text for m in services.chat.history(uid) if m.role == "user"] == ["stored earlier", "now", "and now"]


def test_instructions_too_long_for_the_model_are_refused_before_anything_is_stored(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    with pytest.raises(TooLong, match="The system message and the message are too long together"):
        list(services.chat.reply(uid, "hi", options=ReplyOptions(instructions="x" * 1100)))
    assert services.chat.history(uid) == ()


def test_one_turn_at_a_time_lines_up_waiting_turns_in_order_and_cleans_up():
    """app.chat.OneTurnAtATime: a turn that may wait is let in first come first served, a full
    line or a wait that runs out is Busy, and nothing of a turn that gave up is left behind."""
    import threading
    import time

    from app.chat import OneTurnAtATime
    from app.errors import Busy

    turns, order, entered = OneTurnAtATime(), [], threading.Event()

    def take(name: str, wait_s: float = 10.0, depth: int = 2) -> None:
        with turns.turn_of(1, wait_s, depth):
            order.append(name)

    with turns.turn_of(1, 0, 2):
        with pytest.raises(Busy):  # the page's turn: refused at once
            take("page", wait_s=0)
        second = threading.Thread(target=take, args=("second",))
        second.start()
        while 1 not in turns._waiting:
            time.sleep(0.01)
        third = threading.Thread(target=take, args=("third",))
        third.start()
        while len(turns._waiting.get(1, ())) < 2:
            time.sleep(0.01)
        with pytest.raises(Busy):  # the line holds two already
            take("fourth")
        with turns.turn_of(2, 0, 2):  # another user's turn runs beside: lines are per user
            entered.set()
        with pytest.raises(Busy, match="after 0.05 s"):  # a wait that runs out (a deeper line lets it in)
            take("late", wait_s=0.05, depth=3)
        order.append("first")
    second.join(10), third.join(10)
    assert order == ["first", "second", "third"] and entered.is_set()
    assert turns._waiting == {} and turns._running == set()


def test_web_replicas_on_one_database_run_one_turn_of_a_user_at_a_time(storage, password, monkeypatch):
    """--role web: a turn holds the user's lease in the database; another replica's turn of the same
    user waits for it or is refused, and a replica that died locks the user out for one lease only."""
    monkeypatch.setattr(storage, "settings", replace(storage.settings, turn_lease_s=0.3))
    uid = storage.create_user("alice", password).id
    a, b = OneTurnAtATime(SharedTurns(storage)), OneTurnAtATime(SharedTurns(storage))
    holding, done = threading.Event(), threading.Event()

    def answer_on_a() -> None:
        with a.turn_of(uid, 0, 4):
            holding.set()
            time.sleep(1.0)  # three leases long: A's renewals keep it
        done.set()

    threading.Thread(target=answer_on_a).start()
    holding.wait(5)
    time.sleep(0.6)
    with pytest.raises(Busy):
        with b.turn_of(uid, 0, 4):
            pass
    with b.turn_of(uid, 5, 4):  # waits for A's turn to end
        assert done.is_set()
    assert storage.take_turn(uid, "a replica that dies now")
    started = time.monotonic()
    with b.turn_of(uid, 5, 4):
        assert 0.1 < time.monotonic() - started < 2  # the dead replica's lease ran out


@pytest.mark.parametrize("deleted", [False, True])
def test_a_reply_whose_turn_another_replica_took_over_stops_streaming(storage, live_text_engine, inference_loop,
                                                                       app_settings, password, monkeypatch, caplog,
                                                                       deleted):
    """--role web: once a renewal finds the turn's lease taken, the reply stops at its next piece
    (it could not be stored) instead of running to its end; the message stays. An account deleted
    meanwhile (its lease went with it) is told to log in, not that another message was answered."""
    monkeypatch.setattr(storage, "settings", replace(storage.settings, turn_lease_s=0.3))
    monkeypatch.setattr(storage, "renew_turn", lambda user_id, holder: False)  # the database: no longer ours
    services = Services.create(storage, live_text_engine, inference_loop, replace(app_settings, role="web"))
    uid = services.accounts.sign_up("alice", password).account.id
    gate, streams = threading.Event(), []

    def submit(request):
        streams.append(FakeStream(request, ["Hello", " there", " and", " more."], gate=gate))
        return streams[-1]

    def once_lost() -> None:  # the rest of the reply comes only after the renewal found the lease lost
        wait_for(lambda: "its lease was lost" in caplog.text)
        if deleted:
            storage.delete_user(uid)
        gate.set()

    monkeypatch.setattr(services.chat.loop, "submit", submit)
    threading.Thread(target=once_lost).start()
    shown = []
    with pytest.raises(AccessDenied if deleted else ReplyNotSaved, match="log in" if deleted else "could not be saved"):
        for part in services.chat.reply(uid, "My cat is called Tobrik."):
            shown.append(part)
    assert shown == ["Hello"] and streams[0].cancelled.is_set()
    if not deleted:
        assert [(m.role, m.text) for m in storage.history(uid)] == [("user", "My cat is called Tobrik.")]
    services.downloads.close()


def test_a_replica_that_stalled_past_its_turn_lease_does_not_store_its_reply(storage, live_text_engine,
                                                                              inference_loop, app_settings, password,
                                                                              monkeypatch):
    """--role web: if another replica took the user's turn over meanwhile, this reply is refused,
    not stored beside the other one (the user's message stays)."""
    monkeypatch.setattr(storage, "settings", replace(storage.settings, turn_lease_s=0.1))
    monkeypatch.setattr(storage, "renew_turn", lambda user_id, holder: True)  # stalled: renews nothing
    services = Services.create(storage, live_text_engine, inference_loop, replace(app_settings, role="web"))
    uid = services.accounts.sign_up("alice", password).account.id
    gate = threading.Event()
    monkeypatch.setattr(services.chat.loop, "submit", lambda request: FakeStream(request, ["Hello", " there."], gate=gate))
    taken = []

    def other_replica() -> None:
        time.sleep(0.3)  # past the lease
        taken.append(storage.take_turn(uid, "another replica"))
        gate.set()

    threading.Thread(target=other_replica).start()
    with pytest.raises(ReplyNotSaved, match="could not be saved"):
        list(services.chat.reply(uid, "My cat is called Tobrik."))
    assert taken == [True]
    assert [(m.role, m.text) for m in storage.history(uid)] == [("user", "My cat is called Tobrik.")]
    services.downloads.close()
