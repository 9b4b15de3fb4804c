import json
import threading
import time
import zipfile

import pytest
import torch
from transformers import TextIteratorStreamer

from adapter_core import AdapterState
from adapter_core.conversation import Turn, history_text
from app.errors import AccessDenied, AppError, LoginFailed, RateLimited
from app.service import ReplyStats, _whole_sentences
from app.worker import CompressionWorker
from tests.app.helpers import wait_for
from storage import NotFound, ValidationError


def chat(service, user_id, text) -> tuple[str, ReplyStats]:
    parts = list(service.reply(user_id, text))
    assert isinstance(parts[-1], ReplyStats)
    return "".join(parts[:-1]), parts[-1]


def exported(service, download):
    """The file behind a download link, opened as its owner would."""
    path, _ = service.downloads.find(download.token, None, service.user_exists)
    return zipfile.ZipFile(path)


def run_jobs(service):
    worker = CompressionWorker(service, service.storage)
    while worker.run_once():
        pass


def test_sign_up_log_in_and_wrong_password(service, password):
    uid = service.sign_up("alice", password)
    assert service.log_in("Alice", password) == uid  # usernames are case-folded
    with pytest.raises(LoginFailed):
        service.log_in("alice", "wrong password!")
    with pytest.raises(LoginFailed):
        service.log_in("nobody", password)


def test_sign_up_can_be_closed_by_an_admin(service, password):
    admin = service.ensure_admin("root", password)
    user = service.sign_up("alice", password)
    with pytest.raises(AccessDenied, match="Admins only"):
        service.admin_set_signup(user, False)
    service.admin_set_signup(admin, False)
    with pytest.raises(AccessDenied, match="Sign-up is closed"):
        service.sign_up("bob", password)
    assert service.admin_audit(admin)[0]["action"] == "set_signup"


def test_failed_logins_are_throttled_per_normalised_name_and_address_without_waiting(service, password,
                                                                                   monkeypatch):
    service.settings.login_failures_per_name = "3/15 minutes"
    service.sign_up("alice", password)
    monkeypatch.setattr("time.sleep", lambda s: pytest.fail("a login handler must not sleep"))
    for spelling in ("alice", "ALICE", "ａｌｉｃｅ"):  # look-alike spellings of one stored name share a count
        with pytest.raises(LoginFailed):
            service.log_in(spelling, "wrong password", "10.0.0.1")
    checked = []
    monkeypatch.setattr(service.storage, "authenticate", lambda *a: checked.append(a))
    with pytest.raises(RateLimited, match="Too many failed logins for this account"):
        service.log_in("Alice", password, "10.0.0.1")
    assert checked == []  # refused before any password is checked
    monkeypatch.undo()
    assert service.log_in("alice", password, "10.0.0.2") > 0  # from elsewhere the owner still gets in
    audit = service.storage.list_audit()
    failed = [e for e in audit if e.action == "login_failed"]
    assert len(failed) == 3 and failed[0].details == {"username": "alice", "address": "10.0.0.1"}
    assert failed[0].target_user_id == service.storage.find_user("alice").id


def test_many_names_from_one_address_are_throttled_too(service, password):
    service.settings.login_failures_per_address = "4/15 minutes"
    for i in range(4):
        with pytest.raises(LoginFailed):
            service.log_in(f"user{i}", "wrong password", "10.0.0.9")
    with pytest.raises(RateLimited, match="from this address"):
        service.log_in("someone-else", "wrong password", "10.0.0.9")


def test_sign_ups_are_limited_and_audited(service, password):
    service.settings.signups_per_address = "2/hour"
    service.sign_up("alice", password, "10.0.0.1")
    with pytest.raises(ValidationError):
        service.sign_up("bob", "short", "10.0.0.1")  # a refused sign-up is audited, and not counted
    service.sign_up("bob", password, "10.0.0.1")
    with pytest.raises(RateLimited, match="Too many new accounts from this address"):
        service.sign_up("carol", password, "10.0.0.1")
    service.sign_up("carol", password, "10.0.0.2")
    actions = [(e.action, e.details.get("address")) for e in reversed(service.storage.list_audit())]
    assert actions == [("signup", "10.0.0.1"), ("signup_refused", "10.0.0.1"), ("signup", "10.0.0.1"),
                       ("signup", "10.0.0.2")]
    service.settings.login_failures_per_address = "2/15 minutes"  # refused sign-ups are failed tries too
    with pytest.raises(ValidationError):
        service.sign_up("dave", "short", "10.0.0.3")
    with pytest.raises(ValidationError):
        service.sign_up("dave", "short", "10.0.0.3")
    with pytest.raises(RateLimited, match="failed tries from this address"):
        service.sign_up("dave", password, "10.0.0.3")


def test_messages_are_limited_in_size_and_rate(service, password):
    uid = service.sign_up("alice", password)
    service.settings.max_message_chars = 50
    with pytest.raises(ValidationError, match="at most 50"):
        chat(service, uid, "x" * 51)
    service.settings.messages_per_user = "2/minute"
    chat(service, uid, "one")
    chat(service, uid, "two")
    with pytest.raises(RateLimited, match="faster than the model can answer"):
        chat(service, uid, "three")
    assert [m["text"] for m in service.history(uid) if m["role"] == "user"] == ["one", "two"]


def test_a_turn_is_stored_streamed_and_measured(service, password):
    uid = service.sign_up("alice", password)
    reply, stats = chat(service, uid, "Hello there")
    history = service.history(uid)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["text"] == "Hello there"
    # as streamed, or (cut off by the 6-token cap) up to its last whole sentence
    assert history[1]["text"] in (reply.strip() or "…", _whole_sentences(reply.strip()))
    assert stats.adapter_version is None and stats.pending_turns == 1 and stats.prompt_tokens > 0
    assert stats.total_s >= stats.first_token_s >= 0 and "prompt tokens" in stats.line()


def test_compression_after_n_messages_moves_turns_from_prompt_to_adapter(service, password):
    uid = service.sign_up("alice", password)
    chat(service, uid, "My cat is called Tobrik.")
    assert service.memory_status(uid)["job"] is None  # 1 user message < compress_every (2)
    chat(service, uid, "I live in Quenmoor.")
    assert service.memory_status(uid)["job"]["status"] == "queued"
    run_jobs(service)
    status = service.memory_status(uid)
    assert (status["adapter_version"], status["pending_messages"], status["absorbed_messages"]) == (1, 0, 4)
    _, stats = chat(service, uid, "What is my cat called?")
    assert stats.adapter_version == 1 and stats.pending_turns == 1
    # the stored state is exactly the absorption of the four turns
    messages = service.storage.history(uid)[:4]
    expected = service.engine.absorb(service.engine.empty_state(),
                                     history_text([Turn(m.role, m.text) for m in messages]))
    stored = AdapterState.from_bytes(service.storage.read_snapshot(uid))
    assert all(torch.allclose(stored.sums[k], expected.sums[k], atol=1e-5) for k in expected.sums)


def test_incremental_compression_reads_only_new_turns(service, password):
    uid = service.sign_up("alice", password)
    for text in ("one", "two", "three", "four"):
        chat(service, uid, text)
        run_jobs(service)
    snapshots = service.storage.list_snapshots(uid)
    assert [s.version for s in snapshots] == [1, 2]
    assert snapshots[1].stats["messages"] == 4  # the second compression absorbed only the 4 new turns


def test_idle_trigger_queues_compression(service, password):
    uid = service.sign_up("alice", password)
    chat(service, uid, "just one message")
    service.settings.compress_idle_seconds = 60
    assert service.queue_idle(time.time()) == []  # too recent
    assert service.queue_idle(time.time() + 61) == [uid]
    run_jobs(service)
    assert service.memory_status(uid)["adapter_version"] == 1


def test_forgetting_a_message_rebuilds_the_adapter_without_it(service, password):
    uid = service.sign_up("alice", password)
    chat(service, uid, "My secret code is 4821.")
    chat(service, uid, "I like tea.")
    run_jobs(service)
    secret = service.history(uid)[0]
    assert service.forget(uid, secret["id"]) == 2  # the message and the reply to it
    assert [m["text"] for m in service.history(uid)][0] == "I like tea."
    # until the rebuild lands, answers use no adapter: the old one may still hold the message
    _, stats = chat(service, uid, "What is my code?")
    assert stats.adapter_version is None
    run_jobs(service)
    remaining = service.storage.history(uid)
    assert "4821" not in " ".join(m.text for m in remaining)
    rebuilt = AdapterState.from_bytes(service.storage.read_snapshot(uid))
    never_saw_it = service.engine.absorb(service.engine.empty_state(),
                                         history_text([Turn(m.role, m.text) for m in remaining]))
    assert all(torch.allclose(rebuilt.sums[k], never_saw_it.sums[k], atol=1e-5) for k in rebuilt.sums)
    assert [s.version for s in service.storage.list_snapshots(uid)] == [2]  # the old snapshot is gone


def test_export_holds_history_and_a_peft_adapter(service, password, tmp_path):
    uid = service.sign_up("alice", password)
    chat(service, uid, "hello")
    chat(service, uid, "again")
    run_jobs(service)
    with exported(service, service.export(uid)) as z:
        names = set(z.namelist())
        history = json.loads(z.read("history.json"))
    assert {"history.json", "adapter/state.safetensors", "adapter/peft/adapter_config.json",
            "adapter/peft/adapter_model.safetensors"} <= names
    assert [m["text"] for m in history["messages"] if m["role"] == "user"] == ["hello", "again"]


def test_a_failing_compression_is_retried_and_visible(service, password, monkeypatch):
    uid = service.sign_up("alice", password)
    chat(service, uid, "a")
    chat(service, uid, "b")
    monkeypatch.setattr(service.engine, "absorb", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    assert CompressionWorker(service, service.storage).run_once()
    job = service.memory_status(uid)["job"]
    assert job["status"] == "queued" and job["attempts"] == 1 and "disk on fire" in job["error"]


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_a_damaged_adapter_file_is_served_around_reported_and_rebuilt(service, password, damage):
    admin = service.ensure_admin("root", password)
    uid = service.sign_up("alice", password)
    chat(service, uid, "a")
    chat(service, uid, "b")
    run_jobs(service)
    snapshot = service.storage.latest_snapshot(uid)
    path = service.storage.files.data_dir / snapshot.path
    path.write_bytes(b"garbage") if damage == "garbage" else path.unlink()
    service._drop_state(uid)
    _, stats = chat(service, uid, "c")
    assert stats.adapter_version is None  # served without the adapter
    event = service.admin_audit(admin)[0]
    assert (event["action"], event["user"]) == ("adapter_unreadable", "alice")
    assert service.memory_status(uid)["needs_rebuild"]
    run_jobs(service)  # the rebuild was queued by the detection itself
    _, stats = chat(service, uid, "d")
    assert stats.adapter_version == 2
    assert [e["action"] for e in service.admin_audit(admin)].count("adapter_unreadable") == 1


def test_users_only_ever_see_their_own_data(service, password):
    alice, bob = service.sign_up("alice", password), service.sign_up("bob", password)
    chat(service, alice, "Alice's secret")
    chat(service, alice, "more")
    run_jobs(service)
    assert "Alice's secret" not in json.dumps(service.history(bob))
    with exported(service, service.export(bob)) as z:
        assert "Alice" not in z.read("history.json").decode()
        assert not any(n.startswith("adapter/") for n in z.namelist())
    alice_message = service.history(alice)[0]["id"]
    for guess in (alice_message, "not a number", -1, None):
        with pytest.raises((NotFound, ValidationError)):
            service.forget(bob, guess)
    assert service.history(alice)[0]["id"] == alice_message


@pytest.mark.parametrize("call", [
    lambda s, a, t: s.admin_users(a), lambda s, a, t: s.admin_user(a, t), lambda s, a, t: s.admin_audit(a),
    lambda s, a, t: s.admin_username(a, t),
    lambda s, a, t: s.admin_adapter_summary(a, t), lambda s, a, t: s.admin_probe(a, t, "hi"),
    lambda s, a, t: s.admin_rebuild(a, t), lambda s, a, t: s.admin_reset(a, t),
    lambda s, a, t: s.admin_export_peft(a, t), lambda s, a, t: s.admin_delete_user(a, t),
    lambda s, a, t: s.admin_set_signup(a, False),
])
def test_every_admin_action_refuses_non_admins_and_anonymous_users(service, password, call):
    target = service.sign_up("alice", password)
    mallory = service.sign_up("mallory", password)
    for actor in (mallory, None, 99999):
        with pytest.raises(AccessDenied):
            call(service, actor, target)
    assert service.storage.get_user(target).username == "alice"


def test_admin_pages_and_actions(service, password):
    admin = service.ensure_admin("root", password)
    uid = service.sign_up("alice", password)
    chat(service, uid, "My cat is called Tobrik.")
    chat(service, uid, "ok")
    run_jobs(service)
    assert {u["username"] for u in service.admin_users(admin)} == {"root", "alice"}
    detail = service.admin_user(admin, uid)
    assert detail["snapshots"][0]["version"] == 1 and detail["status"]["absorbed_messages"] == 4
    summary = service.admin_adapter_summary(admin, uid)
    assert len(summary) == len(service.engine.adapted) and summary[0]["singular_values"][0] == 1.0
    answers = service.admin_probe(admin, uid, "What is my cat called?")
    assert set(answers) == {"base model", "adapter", "full history"}
    assert answers["full history"].prompt_tokens > answers["adapter"].prompt_tokens
    assert "adapter_config.json" in exported(service, service.admin_export_peft(admin, uid)).namelist()
    assert service.admin_rebuild(admin, uid) == "alice"
    run_jobs(service)
    assert service.admin_user(admin, uid)["snapshots"][-1]["rebuild"] is True
    assert service.admin_reset(admin, uid) == "alice"
    assert service.memory_status(uid)["messages"] == 0 and service.storage.latest_snapshot(uid) is None
    assert service.admin_delete_user(admin, uid) == "alice"
    actions = [e["action"] for e in service.admin_audit(admin)]
    assert actions[:4] == ["delete_user", "reset_memory", "rebuild_adapter", "export_peft"]
    with pytest.raises(AccessDenied):
        service.history(uid)


def test_admin_actions_on_a_missing_or_malformed_user_are_refusals(service, password):
    admin = service.ensure_admin("root", password)
    for target in (99999, "abc", None):
        with pytest.raises(AppError):
            service.admin_user(admin, target)
        with pytest.raises(AppError):
            service.admin_username(admin, target)
    assert service.admin_username(admin, admin) == "root"
    with pytest.raises(AppError, match="own account"):
        service.admin_delete_user(admin, admin)


def test_a_reply_cut_off_by_the_cap_ends_at_its_last_whole_sentence():
    assert _whole_sentences("I like tea. It is warm! And then the") == "I like tea. It is warm!"
    assert _whole_sentences('She said "go." Then she') == 'She said "go."'
    assert _whole_sentences("no end of a sentence here") == "no end of a sentence here…"
    tail = "Hi. Then a long tail that never ends at all"
    assert _whole_sentences(tail) == tail + "…"
    assert _whole_sentences("version 1.5 is out and") == "version 1.5 is out and…"  # a dot inside a number


def test_a_reply_whose_reader_goes_away_stops_decoding(service, password, monkeypatch):
    uid = service.sign_up("alice", password)
    stopped = []

    def decoding(ids, state, streamer, outcome, stop):
        streamer.on_finalized_text("First words ", stream_end=False)
        stopped.append(stop.wait(10))  # decoding goes on until told to stop
        streamer.end()

    monkeypatch.setattr(service, "_generate", decoding)
    replies = service.reply(uid, "hi")
    assert next(replies) == "First words "
    replies.close()  # as when the person logs out or the tab closes mid-reply
    wait_for(lambda: stopped)
    assert stopped == [True]


def test_a_stop_ends_decoding_at_the_next_token(service, monkeypatch):
    stop, outcome = threading.Event(), {}
    stop.set()
    written = []
    generate = service.engine.generate

    def recording(input_ids, **kwargs):
        out = generate(input_ids, **kwargs)
        written.append(out.shape[1] - input_ids.shape[1])
        return out

    monkeypatch.setattr(service.engine, "generate", recording)
    service._generate([5, 6, 7], None, TextIteratorStreamer(service.engine.tokenizer), outcome, stop)
    assert written == [1] and outcome == {"hit_cap": False}
