"""The repository API, on SQLite and PostgreSQL."""

import os
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from argon2 import PasswordHasher
from sqlalchemy import event, select, update

from storage import (
    CursorError, LeaseLost, MessageCounts, NotFound, RebuildRequired, SnapshotFileError, Storage, StorageError,
    ValidationError,
)
from storage.models import CompressionJob, Message, SnapshotBlob, TurnLease
from tests.storage.helpers import FAST, PASSWORD, files_under, table_counts, transactions, user_row_counts


def _chat(storage, user, *texts):
    conversation = storage.start_conversation(user.id, "chat")
    return conversation, [storage.append_message(user.id, conversation.id, "user" if i % 2 == 0 else "assistant",
                                                 text, len(text.split())) for i, text in enumerate(texts)]


def _commit(storage, user, cursor, data=b"state", **kwargs):
    arguments = dict(generator_id="gen-1", base_model_id="model-1", cursor=cursor, tokens_absorbed=3) | kwargs
    return storage.commit_snapshot(user.id, data, **arguments)


def _marks(storage, user):
    return {m.id: m.snapshot_id for m in storage.history(user.id)}


# --- users -------------------------------------------------------------------------------------

def test_created_users_have_an_argon2id_hash_and_a_normalised_name(storage):
    user = storage.create_user("Alice", PASSWORD, is_admin=True)
    assert user.username == "alice" and user.is_admin and not user.needs_rebuild
    assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
    assert storage.get_user(user.id).password_hash == user.password_hash
    assert storage.find_user("ALICE").id == user.id and storage.find_user("nobody") is None


def test_authenticate(storage, alice):
    assert storage.authenticate("alice", PASSWORD).id == alice.id
    assert storage.authenticate("ＡＬＩＣＥ", PASSWORD).id == alice.id
    assert storage.authenticate("alice", PASSWORD + "!") is None
    assert storage.authenticate("alice", "") is None
    assert storage.authenticate("nobody", PASSWORD) is None
    assert storage.authenticate("bad\x00name", PASSWORD) is None
    assert storage.authenticate("alice", "x" * 10_000_000) is None


def test_an_unknown_user_costs_a_hash_like_a_known_one(storage, alice, monkeypatch):
    verified = []
    real_verify = PasswordHasher.verify

    def spy(hasher, password_hash, password):
        verified.append(password_hash)
        return real_verify(hasher, password_hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", spy)
    storage.authenticate("nobody", PASSWORD)
    storage.authenticate("alice", "wrong password")
    assert len(verified) == 2 and verified[0] != verified[1]


def test_passwords_are_rehashed_when_the_argon2_costs_change(db_url, data_dir, storage, alice):
    stronger = FAST.__class__(**(vars(FAST) | {"argon2_time_cost": 2}))
    with Storage(db_url, data_dir, stronger) as store:
        user = store.authenticate("alice", PASSWORD)
        assert user.password_hash != alice.password_hash and "t=2" in user.password_hash
        assert store.get_user(alice.id).password_hash == user.password_hash
        assert store.authenticate("alice", PASSWORD).password_hash == user.password_hash  # once only
    assert storage.authenticate("alice", PASSWORD) is not None  # old costs still verify


def test_set_admin_and_list_users(storage, alice, bob):
    storage.set_admin(bob.id, True, actor_id=alice.id)
    assert [(u.username, u.is_admin) for u in storage.list_users()] == [("alice", False), ("bob", True)]
    entry, = storage.list_audit()
    assert (entry.actor_id, entry.action, entry.target_user_id, entry.details) == (
        alice.id, "set_admin", bob.id, {"is_admin": True})
    with pytest.raises(NotFound):
        storage.set_admin(999_999, True)


def test_audit_log(storage, alice, bob):
    first = storage.record_audit(alice.id, "reset_adapter", bob.id, {"reason": "asked"})
    storage.record_audit(None, "maintenance")
    assert [e.action for e in storage.list_audit()] == ["maintenance", "reset_adapter"]
    assert [e.id for e in storage.list_audit(target_user_id=bob.id)] == [first.id]
    assert first.created_at.tzinfo is not None
    with pytest.raises(NotFound):
        storage.record_audit(999_999, "x")


def test_an_audit_row_keeps_the_names_after_the_accounts_are_deleted(storage, alice, bob):
    """Deleting an account sets its ids in the audit log to NULL; the names say who it was."""
    storage.record_audit(alice.id, "reset_adapter", bob.id)
    storage.delete_user(bob.id, actor_id=alice.id)
    storage.delete_user(alice.id)
    rows = storage.list_audit()
    assert [(e.actor_id, e.actor_name, e.action, e.target_user_id, e.target_name) for e in rows][-2:] == [
        (None, "alice", "delete_user", None, "bob"), (None, "alice", "reset_adapter", None, "bob")]


# --- conversations and messages -----------------------------------------------------------------

def test_messages_come_back_in_order(storage, alice):
    first, sent = _chat(storage, alice, "hello", "hi, how can I help?", "my cat is Tobrik")
    second, more = _chat(storage, alice, "new topic")
    assert [m.text for m in storage.history(alice.id)] == [m.text for m in sent + more]
    assert [m.id for m in storage.history(alice.id, first.id)] == [m.id for m in sent]
    assert [m.role for m in sent] == ["user", "assistant", "user"]
    assert sent[2].token_count == 4 and sent[2].snapshot_id is None
    assert [c.id for c in storage.list_conversations(alice.id)] == [first.id, second.id]
    assert storage.get_conversation(alice.id, first.id).title == "chat"


def test_messages_after_a_cursor(storage, alice, bob):
    _, sent = _chat(storage, alice, "a", "b", "c", "d")
    _chat(storage, bob, "bob's")
    assert [m.text for m in storage.messages_after(alice.id, 0)] == ["a", "b", "c", "d"]
    assert [m.text for m in storage.messages_after(alice.id, sent[1].id)] == ["c", "d"]
    assert [m.text for m in storage.messages_after(alice.id, sent[1].id, limit=1)] == ["c"]
    assert storage.messages_after(alice.id, sent[3].id) == []


def test_a_user_never_reaches_another_users_data(storage, alice, bob):
    conversation, (message,) = _chat(storage, alice, "alice's secret")
    _commit(storage, alice, message.id)
    before = table_counts(storage)
    with pytest.raises(NotFound):
        storage.get_conversation(bob.id, conversation.id)
    with pytest.raises(NotFound):
        storage.append_message(bob.id, conversation.id, "user", "sneaky", 1)
    with pytest.raises(NotFound):
        storage.history(bob.id, conversation.id)
    with pytest.raises(NotFound):
        storage.delete_message(bob.id, message.id)
    with pytest.raises(NotFound):
        storage.read_snapshot(bob.id, storage.latest_snapshot(alice.id).id)
    assert storage.history(bob.id) == [] and storage.messages_after(bob.id, 0) == []
    assert storage.list_conversations(bob.id) == [] and storage.latest_snapshot(bob.id) is None
    assert table_counts(storage) == before
    assert not storage.get_user(alice.id).needs_rebuild
    with pytest.raises(NotFound):
        storage.start_conversation(999_999)


# --- turns -------------------------------------------------------------------------------------

def test_a_turn_starts_a_conversation_and_reads_what_it_needs_in_one_transaction(storage, alice):
    with transactions(storage) as begun:
        first = storage.begin_turn(alice.id, "hello", 1)
    assert len(begun) == 1
    assert (first.message.role, first.message.text, first.message.token_count) == ("user", "hello", 1)
    assert first.snapshot is None and not first.needs_rebuild and first.pending == ()
    assert [c.id for c in storage.list_conversations(alice.id)] == [first.message.conversation_id]
    with transactions(storage) as begun:
        end = storage.finish_turn(alice.id, first.message.conversation_id, "hi there", 2, compress_every=4)
    assert len(begun) == 1 and end.job is None
    second = storage.begin_turn(alice.id, "my cat is Tobrik", 4)
    assert second.message.conversation_id == first.message.conversation_id  # the latest conversation
    assert [m.id for m in second.pending] == [first.message.id, end.message.id]
    assert [m.text for m in storage.history(alice.id)] == ["hello", "hi there", "my cat is Tobrik"]


def test_a_turn_reads_only_what_the_adapter_does_not_hold(storage, alice, bob):
    _, sent = _chat(storage, alice, "a", "b", "c")
    newer = storage.start_conversation(alice.id)
    _chat(storage, bob, "bob's")
    snapshot = _commit(storage, alice, sent[1].id)
    turn = storage.begin_turn(alice.id, "d", 1)
    assert turn.message.conversation_id == newer.id
    assert turn.snapshot.id == snapshot.id and [m.text for m in turn.pending] == ["c"]
    storage.delete_message(alice.id, sent[0].id)
    turn = storage.begin_turn(alice.id, "e", 1)
    # the adapter may hold the deleted message: every message is pending until the rebuild
    assert turn.needs_rebuild and turn.snapshot.id == snapshot.id
    assert [m.text for m in turn.pending] == ["b", "c", "d"]


def test_a_refused_turn_writes_nothing(storage, alice):
    before = table_counts(storage)
    for text, tokens in (("", 1), ("a\x00b", 1), ("fine", -1)):
        with pytest.raises(ValidationError):
            storage.begin_turn(alice.id, text, tokens)
    with pytest.raises(NotFound):
        storage.begin_turn(999_999, "hello", 1)
    assert table_counts(storage) == before


def test_finishing_a_turn_queues_compression_once_enough_user_messages_wait(storage, alice, bob):
    turn = storage.begin_turn(alice.id, "one", 1)
    conversation = turn.message.conversation_id
    assert storage.finish_turn(alice.id, conversation, "reply", 1, compress_every=2).job is None
    storage.begin_turn(alice.id, "two", 1)
    end = storage.finish_turn(alice.id, conversation, "reply", 1, compress_every=2)
    assert end.job is not None and storage.active_job(alice.id).id == end.job.id
    assert (end.message.role, end.message.conversation_id) == ("assistant", conversation)
    _commit(storage, alice, end.message.id)
    storage.claim_job()
    storage.begin_turn(alice.id, "three", 1)
    assert storage.finish_turn(alice.id, conversation, "reply", 1, compress_every=2).job is None  # 1 waits now
    before = table_counts(storage)
    with pytest.raises(NotFound):
        storage.finish_turn(bob.id, conversation, "sneaky", 1, compress_every=1)
    with pytest.raises(ValidationError):
        storage.finish_turn(alice.id, conversation, "reply", 1, compress_every=-1)
    assert table_counts(storage) == before


def test_an_unusable_snapshot_is_reported_once_and_rebuilt(storage, alice, data_dir):
    _, sent = _chat(storage, alice, "a", "b")
    snapshot = _commit(storage, alice, sent[1].id, b"good bytes")
    assert storage.read_snapshot_file(snapshot) == b"good bytes"
    (data_dir / snapshot.path).write_bytes(b"evil bytes")
    with transactions(storage) as begun:
        with pytest.raises(SnapshotFileError, match="sha256"):
            storage.read_snapshot_file(snapshot)
    assert begun == []  # the row was read already: only the disk is
    with transactions(storage) as begun:
        history = storage.report_unusable_snapshot(alice.id, snapshot.id, {"error": "sha256"})
    assert len(begun) == 1 and [m.id for m in history] == [m.id for m in sent]
    user = storage.get_user(alice.id)
    assert user.needs_rebuild and user.history_revision == 0  # no history changed
    assert storage.active_job(alice.id) is not None
    entry, = storage.list_audit(target_user_id=alice.id)
    assert (entry.actor_id, entry.action, entry.details) == (None, "adapter_unreadable",
                                                             {"version": 1, "error": "sha256"})
    storage.report_unusable_snapshot(alice.id, snapshot.id, {"error": "again"})
    assert len(storage.list_audit(target_user_id=alice.id)) == 1
    rebuilt = _commit(storage, alice, sent[1].id, b"rebuilt", rebuild_revision=0)
    storage.report_unusable_snapshot(alice.id, snapshot.id, {"error": "late"})  # replaced meanwhile
    assert not storage.get_user(alice.id).needs_rebuild and len(storage.list_audit()) == 1
    assert storage.latest_snapshot(alice.id).id == rebuilt.id


# --- snapshots ---------------------------------------------------------------------------------

def test_commit_and_read_a_snapshot(storage, alice, data_dir):
    _, sent = _chat(storage, alice, "a", "b", "c")
    snapshot = _commit(storage, alice, sent[1].id, b"state one", stats={"loss": 0.5})
    assert (snapshot.version, snapshot.cursor, snapshot.size_bytes, snapshot.stats) == (1, sent[1].id, 9, {"loss": 0.5})
    assert (data_dir / snapshot.path).read_bytes() == b"state one"
    assert snapshot.path.startswith(f"adapters/user-{alice.id}/")
    assert storage.read_snapshot(alice.id) == b"state one"
    assert _marks(storage, alice) == {sent[0].id: snapshot.id, sent[1].id: snapshot.id, sent[2].id: None}
    assert [m.id for m in storage.messages_after(alice.id, snapshot.cursor)] == [sent[2].id]

    second = _commit(storage, alice, sent[2].id, b"state two", tokens_absorbed=5)
    assert second.version == 2 and storage.latest_snapshot(alice.id).id == second.id
    assert _marks(storage, alice)[sent[2].id] == second.id and _marks(storage, alice)[sent[0].id] == snapshot.id
    assert storage.read_snapshot(alice.id) == b"state two"
    assert storage.read_snapshot(alice.id, snapshot.id) == b"state one"
    assert [s.version for s in storage.list_snapshots(alice.id)] == [1, 2]


def test_reading_a_damaged_or_missing_snapshot_fails_clearly(storage, alice, data_dir):
    _, (message,) = _chat(storage, alice, "a")
    snapshot = _commit(storage, alice, message.id, b"good bytes")
    (data_dir / snapshot.path).write_bytes(b"evil bytes")
    with pytest.raises(SnapshotFileError, match="sha256"):
        storage.read_snapshot(alice.id)
    (data_dir / snapshot.path).unlink()
    with pytest.raises(SnapshotFileError, match="missing"):
        storage.read_snapshot(alice.id)
    with pytest.raises(NotFound):
        storage.read_snapshot(alice.id, snapshot.id + 1000)


def test_cursors_only_move_forward_onto_the_users_own_messages(storage, alice, bob, data_dir):
    _, sent = _chat(storage, alice, "a", "b")
    _, (bobs,) = _chat(storage, bob, "bob's")
    with pytest.raises(CursorError, match="does not move past"):
        _commit(storage, alice, 0)
    _commit(storage, alice, sent[1].id)
    before = table_counts(storage), files_under(data_dir)
    for cursor, reason in [(sent[1].id, "does not move past"), (sent[0].id, "does not move past"),
                           (bobs.id, "not one of user"), (bobs.id + 1000, "not one of user")]:
        with pytest.raises(CursorError, match=reason):
            _commit(storage, alice, cursor, data=f"never stored {cursor}".encode())
    assert (table_counts(storage), files_under(data_dir)) == before


def test_another_generator_must_rebuild_rather_than_add_to_a_snapshot(storage, alice):
    _, sent = _chat(storage, alice, "a", "b")
    _commit(storage, alice, sent[0].id)
    for other in (dict(generator_id="gen-2"), dict(base_model_id="model-2")):
        with pytest.raises(RebuildRequired, match="another generator or model"):
            _commit(storage, alice, sent[1].id, **other)
    rebuilt = _commit(storage, alice, sent[1].id, generator_id="gen-2", rebuild_revision=0)
    assert [s.generator_id for s in storage.list_snapshots(alice.id)] == ["gen-2"]
    assert _marks(storage, alice) == {sent[0].id: rebuilt.id, sent[1].id: rebuilt.id}


def test_the_row_commits_only_after_the_file_is_durable(storage, alice, data_dir, monkeypatch):
    _, (message,) = _chat(storage, alice, "a")
    before = table_counts(storage)

    def no_disk(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", no_disk)
    with pytest.raises(OSError, match="Input/output"):
        _commit(storage, alice, message.id)
    monkeypatch.undo()
    assert table_counts(storage) == before and storage.latest_snapshot(alice.id) is None
    assert files_under(data_dir / "adapters") == []


def test_a_failed_commit_leaves_at_most_an_orphan_file_that_cleanup_removes(storage, alice, data_dir, monkeypatch):
    _, (message,) = _chat(storage, alice, "a")
    kept = _commit(storage, alice, message.id, b"kept")
    _, (newer,) = _chat(storage, alice, "b")

    real_write = storage.files.write

    def write_then_crash(user_id, data):
        real_write(user_id, data)
        raise RuntimeError("crash between file and row")

    monkeypatch.setattr(storage.files, "write", write_then_crash)
    with pytest.raises(RuntimeError, match="crash"):
        _commit(storage, alice, newer.id, b"orphan")
    monkeypatch.undo()
    assert len(files_under(data_dir / "adapters")) == 2
    assert storage.remove_orphan_files() == []  # too young: it might belong to a commit in progress
    old = time.time() - 7200
    for path in files_under(data_dir / "adapters"):
        os.utime(path, (old, old))
    removed = storage.remove_orphan_files()
    assert len(removed) == 1 and removed[0] != kept.path
    assert storage.read_snapshot(alice.id) == b"kept"


# --- deletion ----------------------------------------------------------------------------------

def test_deleting_a_message_asks_for_a_rebuild(storage, alice, data_dir):
    _, sent = _chat(storage, alice, "a", "secret", "c")
    old = _commit(storage, alice, sent[2].id, b"holds the secret")
    storage.delete_message(alice.id, sent[1].id)
    user = storage.get_user(alice.id)
    assert user.needs_rebuild and user.history_revision == 1
    assert [m.text for m in storage.history(alice.id)] == ["a", "c"]
    _, (newer,) = _chat(storage, alice, "d")
    with pytest.raises(RebuildRequired, match="rebuild it"):
        _commit(storage, alice, newer.id)
    with pytest.raises(RebuildRequired, match="history changed"):
        _commit(storage, alice, sent[2].id, b"rebuilt", rebuild_revision=0)

    rebuilt = _commit(storage, alice, sent[2].id, b"rebuilt", rebuild_revision=1)
    assert not storage.get_user(alice.id).needs_rebuild
    assert [s.id for s in storage.list_snapshots(alice.id)] == [rebuilt.id]  # the old one held the secret
    assert not (data_dir / old.path).exists()
    assert files_under(data_dir / "adapters") == [data_dir / rebuilt.path]
    assert _marks(storage, alice) == {sent[0].id: rebuilt.id, sent[2].id: rebuilt.id, newer.id: None}
    assert _commit(storage, alice, newer.id, b"next").version == rebuilt.version + 1


def test_forgetting_a_turn_deletes_the_reply_too(storage, alice):
    conversation, sent = _chat(storage, alice, "my pin is 4821", "noted: 4821", "hello", "hi")
    _commit(storage, alice, sent[3].id)
    assert storage.delete_message(alice.id, sent[0].id, with_reply=True) == [sent[0].id, sent[1].id]
    assert [m.text for m in storage.history(alice.id)] == ["hello", "hi"]
    user = storage.get_user(alice.id)
    assert user.needs_rebuild and user.history_revision == 1  # one deletion, one revision
    with pytest.raises(RebuildRequired):
        _commit(storage, alice, sent[3].id)


def test_forgetting_takes_only_the_reply_that_follows_in_the_same_conversation(storage, alice):
    first = storage.start_conversation(alice.id)
    second = storage.start_conversation(alice.id)
    asked = storage.append_message(alice.id, first.id, "user", "question", 1)
    elsewhere = storage.append_message(alice.id, second.id, "assistant", "another chat's answer", 3)
    answer = storage.append_message(alice.id, first.id, "assistant", "answer", 1)
    unanswered = storage.append_message(alice.id, first.id, "user", "no answer yet", 3)
    follow_up = storage.append_message(alice.id, first.id, "user", "still waiting", 2)
    assert storage.delete_message(alice.id, asked.id, with_reply=True) == [asked.id, answer.id]
    assert storage.delete_message(alice.id, unanswered.id, with_reply=True) == [unanswered.id]
    assert storage.delete_message(alice.id, elsewhere.id, with_reply=True) == [elsewhere.id]  # not a user's
    assert [m.id for m in storage.history(alice.id)] == [follow_up.id]
    assert storage.get_user(alice.id).history_revision == 3


def test_deleting_without_the_reply_returns_the_one_id(storage, alice):
    _, sent = _chat(storage, alice, "question", "answer")
    assert storage.delete_message(alice.id, sent[0].id) == [sent[0].id]
    assert [m.id for m in storage.history(alice.id)] == [sent[1].id]


def test_nobody_forgets_another_users_turn(storage, alice, bob):
    _, sent = _chat(storage, alice, "question", "answer")
    before = table_counts(storage)
    with pytest.raises(NotFound):
        storage.delete_message(bob.id, sent[0].id, with_reply=True)
    with pytest.raises(NotFound):
        storage.delete_message(alice.id, 999_999, with_reply=True)
    assert table_counts(storage) == before
    assert storage.get_user(bob.id).history_revision == storage.get_user(alice.id).history_revision == 0


def test_a_turn_is_forgotten_in_one_transaction(storage, alice):
    """Should the bookkeeping fail after the deletions, the question and the answer both stay."""
    _, sent = _chat(storage, alice, "question", "answer")

    def fail_on_bookkeeping(connection, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE USERS"):
            raise RuntimeError("crash before the history revision is bumped")

    event.listen(storage.engine, "before_cursor_execute", fail_on_bookkeeping)
    try:
        with pytest.raises(RuntimeError, match="crash"):
            storage.delete_message(alice.id, sent[0].id, with_reply=True)
    finally:
        event.remove(storage.engine, "before_cursor_execute", fail_on_bookkeeping)
    assert [m.id for m in storage.history(alice.id)] == [sent[0].id, sent[1].id]
    assert storage.get_user(alice.id).history_revision == 0


def test_a_rebuild_may_start_from_nothing(storage, alice):
    _, (only,) = _chat(storage, alice, "forget me")
    _commit(storage, alice, only.id)
    storage.delete_message(alice.id, only.id)
    empty = _commit(storage, alice, 0, b"empty state", rebuild_revision=1, tokens_absorbed=0)
    assert empty.cursor == 0 and not storage.get_user(alice.id).needs_rebuild
    assert storage.history(alice.id) == [] and storage.read_snapshot(alice.id) == b"empty state"


def test_an_admin_can_ask_for_a_rebuild(storage, alice, bob):
    _, sent = _chat(storage, alice, "a", "b")
    _commit(storage, alice, sent[1].id)
    storage.request_rebuild(alice.id, actor_id=bob.id)
    assert storage.get_user(alice.id).needs_rebuild
    with pytest.raises(RebuildRequired):
        _commit(storage, alice, sent[1].id)
    entry = storage.list_audit(target_user_id=alice.id)[0]
    assert (entry.action, entry.actor_id) == ("rebuild_adapter", bob.id)


def test_resetting_memory_forgets_everything_but_the_account(storage, alice, bob, data_dir):
    _, sent = _chat(storage, alice, "a", "b")
    snapshot = _commit(storage, alice, sent[1].id)
    _chat(storage, bob, "bob's")
    storage.queue_job(alice.id)
    revision = storage.get_user(alice.id).history_revision
    storage.reset_memory(alice.id, actor_id=bob.id)
    counts = user_row_counts(storage, alice.id)
    assert counts["messages"] == counts["adapter_snapshots"] == counts["conversations"] == 0
    assert counts["compression_jobs"] == 0 and counts["users"] == 1
    assert not (data_dir / snapshot.path).exists()
    assert storage.get_user(alice.id).history_revision == revision + 1  # a rebuild in flight cannot land
    assert [m.text for m in storage.history(bob.id)] == ["bob's"]
    assert storage.list_audit(target_user_id=alice.id)[0].action == "reset_memory"


def test_message_counts(storage, alice, bob):
    assert storage.message_counts(alice.id) == MessageCounts(0, 0, 0, 0, 0)
    _, sent = _chat(storage, alice, "one two", "three", "four five six")  # 2, 1 and 3 tokens
    _chat(storage, bob, "bob's words here")
    _commit(storage, alice, sent[1].id)
    assert storage.message_counts(alice.id) == MessageCounts(messages=3, absorbed_messages=2, absorbed_tokens=3,
                                                             pending_messages=1, pending_tokens=3)


def test_a_memory_summary_is_one_read(storage, alice, bob):
    _, sent = _chat(storage, alice, "one two", "three", "four five six")
    snapshot = _commit(storage, alice, sent[1].id)
    job = storage.queue_job(alice.id)
    with transactions(storage) as begun:
        summary = storage.memory_summary(alice.id)
    assert len(begun) == 1
    assert (summary.user.id, summary.snapshot.id, summary.job.id) == (alice.id, snapshot.id, job.id)
    assert summary.counts == storage.message_counts(alice.id)
    empty = storage.memory_summary(bob.id)
    assert (empty.snapshot, empty.job, empty.counts) == (None, None, MessageCounts(0, 0, 0, 0, 0))
    with pytest.raises(NotFound):
        storage.memory_summary(999_999)


def test_user_summaries_are_one_query(storage, alice, bob):
    _, sent = _chat(storage, alice, "a", "b", "c")
    _commit(storage, alice, sent[0].id)
    _commit(storage, alice, sent[2].id)
    with transactions(storage) as begun:
        rows = storage.user_summaries()
    assert len(begun) == 1
    assert [(r.user.username, r.messages, r.adapter_version) for r in rows] == [("alice", 3, 2), ("bob", 0, None)]


def test_pending_users_and_active_job(storage, alice, bob):
    assert storage.pending_users() == []
    _, sent = _chat(storage, alice, "a", "b", "c")
    _chat(storage, bob, "x")
    _commit(storage, alice, sent[1].id)
    pending = storage.pending_users()
    assert [(user_id, count) for user_id, count, _ in pending] == [(alice.id, 1), (bob.id, 1)]
    newest = pending[0][2]
    assert newest.tzinfo is not None and abs(newest - sent[2].created_at) < timedelta(seconds=1)
    assert storage.active_job(alice.id) is None
    job = storage.queue_job(alice.id)
    assert storage.active_job(alice.id).id == job.id and storage.active_job(bob.id) is None


def test_deleting_a_user_leaves_nothing_of_theirs(db_url, storage, alice, bob, data_dir):
    for user in (alice, bob):
        _, sent = _chat(storage, user, "a", "b", "c")
        _commit(storage, user, sent[1].id, f"{user.username} file".encode())
        with Storage(db_url, data_dir, replace(FAST, snapshot_store="database")) as shared:  # and one in the database
            _commit(shared, user, sent[2].id, f"{user.username} state".encode())
        storage.queue_job(user.id)
        storage.record_audit(user.id, "self_service", user.id)
        storage.create_api_key(user.id, "a client")
        storage.start_login(user.id)
        assert storage.take_turn(user.id, "replica-a")
        assert storage.add_download(f"link-{user.id}", user.id, user.id, None, "a.zip", b"zip",
                                    datetime.now(timezone.utc) + timedelta(minutes=10), (0, 0))
    storage.set_admin(bob.id, True, actor_id=alice.id)
    assert storage.claim_job() is not None
    assert all(user_row_counts(storage, alice.id).values())
    bob_before = user_row_counts(storage, bob.id)

    storage.delete_user(alice.id, actor_id=bob.id)
    assert user_row_counts(storage, alice.id) == dict.fromkeys(user_row_counts(storage, alice.id), 0)
    assert not (data_dir / "adapters" / f"user-{alice.id}").exists()
    assert storage.find_user("alice") is None
    with pytest.raises(NotFound):
        storage.get_user(alice.id)
    bob_after = user_row_counts(storage, bob.id)
    assert bob_after == bob_before | {"audit_log": bob_before["audit_log"] + 1}  # the deletion, by bob
    assert storage.read_snapshot(bob.id) == b"bob state"
    assert storage.list_audit()[0].action == "delete_user"
    with pytest.raises(NotFound):
        storage.delete_user(alice.id)


def test_snapshots_kept_in_the_database_are_read_by_another_machine_and_leave_nothing_behind(db_url, storage, alice,
                                                                                             tmp_path, data_dir):
    """snapshot_store "database": replicas on other machines share only the database."""
    _, sent = _chat(storage, alice, "a", "b", "c", "d")
    on_disk = _commit(storage, alice, sent[1].id, b"from a file")  # made before the switch: stays a file
    shared = replace(FAST, snapshot_store="database")
    with Storage(db_url, data_dir, shared) as here, Storage(db_url, tmp_path / "elsewhere", shared) as there:
        kept = _commit(here, alice, sent[3].id, b"in the database")
        assert kept.path.startswith("database/") and files_under(data_dir) == [data_dir / on_disk.path]
        assert there.read_snapshot(alice.id) == b"in the database"  # no shared folder needed
        assert here.read_snapshot(alice.id, on_disk.id) == b"from a file"  # a file: read on its own machine
        same = _commit(here, alice, sent[3].id, b"in the database", rebuild_revision=alice.history_revision)
        assert table_counts(here)["snapshot_blobs"] == 1  # the rebuild replaced both: one blob, no file
        assert files_under(data_dir) == [] and there.read_snapshot(alice.id) == b"in the database"
        with storage.engine.begin() as connection:
            connection.execute(update(SnapshotBlob).values(data=b"in the dataBase"))
        with pytest.raises(SnapshotFileError, match="sha256"):
            there.read_snapshot(alice.id, same.id)
        here.delete_user(alice.id)
        assert table_counts(here)["snapshot_blobs"] == 0


def test_a_users_turn_is_held_by_one_replica_at_a_time_until_its_lease_runs_out(storage, alice, bob):
    assert storage.take_turn(alice.id, "replica-a")
    assert not storage.take_turn(alice.id, "replica-b")  # A answers alice now
    assert storage.take_turn(bob.id, "replica-b")  # another user's turn is another lease
    assert storage.take_turn(alice.id, "replica-a")  # the holder may take it again (a renewal)
    storage.end_turn(alice.id, "replica-b")  # not B's to give back: nothing happens
    assert not storage.take_turn(alice.id, "replica-b")
    storage.end_turn(alice.id, "replica-a")
    assert storage.take_turn(alice.id, "replica-b")
    assert not storage.renew_turn(alice.id, "replica-a") and storage.renew_turn(alice.id, "replica-b")
    with storage.engine.begin() as connection:  # B died: its lease runs out
        connection.execute(update(TurnLease).values(lease_until=datetime.now(timezone.utc) - timedelta(seconds=1)))
    assert storage.take_turn(alice.id, "replica-a")
    assert not storage.renew_turn(alice.id, "replica-b")
    with pytest.raises(NotFound):
        storage.take_turn(999_999, "replica-a")


# --- compression jobs --------------------------------------------------------------------------

def test_queueing_is_idempotent(storage, alice, bob):
    job = storage.queue_job(alice.id)
    assert (job.status, job.attempts) == ("queued", 0)
    assert storage.queue_job(alice.id).id == job.id
    assert storage.queue_job(bob.id).id != job.id


def test_claiming_takes_the_oldest_due_job_once(storage, alice, bob):
    first, second = storage.queue_job(alice.id), storage.queue_job(bob.id)
    claimed = storage.claim_job()
    assert (claimed.id, claimed.status, claimed.attempts) == (first.id, "running", 1)
    assert claimed.started_at is not None
    assert storage.claim_job().id == second.id
    assert storage.claim_job() is None
    assert storage.queue_job(alice.id).id == first.id  # still the active one: no second job


def test_a_job_asked_for_while_running_gets_a_follow_up(storage, alice):
    job = storage.queue_job(alice.id)
    storage.claim_job()
    assert storage.finish_job(job.id) is None
    assert storage.get_job(job.id).status == "done" and storage.get_job(job.id).finished_at is not None

    again = storage.queue_job(alice.id)
    assert storage.claim_job().id == again.id
    assert storage.queue_job(alice.id).id == again.id  # new messages arrived while it ran
    follow_up = storage.finish_job(again.id)
    assert follow_up is not None and follow_up.status == "queued" and follow_up.id != again.id
    assert storage.claim_job().id == follow_up.id
    with pytest.raises(StorageError, match="is done, not running"):
        storage.finish_job(again.id)
    with pytest.raises(NotFound):
        storage.finish_job(999_999)


def test_failed_runs_are_retried_with_backoff_then_fail(storage, alice):
    job = storage.queue_job(alice.id)
    delays = []
    for attempt in range(1, FAST.job_max_attempts + 1):
        claimed = storage.claim_job()
        assert (claimed.id, claimed.attempts) == (job.id, attempt)
        failed_at = datetime.now(timezone.utc)
        result = storage.fail_job(job.id, f"boom {attempt}\x00\ud800")
        assert result.error.startswith(f"boom {attempt}")
        if result.status == "queued":
            delays.append(result.not_before - failed_at)
            assert storage.claim_job() is None  # not due yet
            with storage.engine.begin() as connection:  # let the time pass
                connection.execute(update(CompressionJob).values(not_before=datetime.now(timezone.utc)))
    assert result.status == "failed" and result.finished_at is not None and result.attempts == 3
    assert [round(d.total_seconds()) for d in delays] == [10, 20]  # base 10 s, doubling
    assert FAST.retry_delay_s(3) == 25.0  # capped at job_retry_max_s
    assert storage.claim_job() is None
    assert storage.queue_job(alice.id).id != job.id  # a failed job no longer blocks new ones


def _lease_runs_out(storage, job_id):
    with storage.engine.begin() as connection:
        connection.execute(update(CompressionJob).where(CompressionJob.id == job_id)
                           .values(lease_until=datetime.now(timezone.utc) - timedelta(seconds=1)))


def test_a_claim_holds_the_job_for_its_lease_and_renewing_extends_it(storage, alice):
    storage.queue_job(alice.id)
    before = datetime.now(timezone.utc)
    claimed = storage.claim_job()
    lease = claimed.lease_until - before
    assert timedelta(seconds=FAST.job_lease_s - 5) <= lease <= timedelta(seconds=FAST.job_lease_s + 5)
    assert storage.claim_job() is None  # held: no other worker gets it
    _lease_runs_out(storage, claimed.id)
    assert storage.renew_lease(claimed.claim)  # still nobody else's: renewing takes it back
    assert storage.get_job(claimed.id).lease_until > datetime.now(timezone.utc)
    assert storage.claim_job() is None


def test_a_job_whose_worker_stopped_renewing_is_taken_over_and_the_first_run_stores_nothing(storage, alice):
    """Two workers racing on one user never write two snapshots for one job: the run that lost
    its lease can neither commit, nor renew, nor finish it."""
    _, sent = _chat(storage, alice, "my dog is Rex", "ok")
    storage.queue_job(alice.id)
    first = storage.claim_job()
    _lease_runs_out(storage, first.id)
    second = storage.claim_job()
    assert (second.id, second.attempts, second.status) == (first.id, 2, "running")
    assert second.error.startswith("interrupted")
    assert not storage.renew_lease(first.claim)
    with pytest.raises(LeaseLost):
        _commit(storage, alice, sent[1].id, b"late", claim=first.claim)
    assert storage.latest_snapshot(alice.id) is None
    with pytest.raises(LeaseLost):
        storage.finish_job(first.id, first.claim)
    with pytest.raises(LeaseLost):
        storage.fail_job(first.id, "boom", first.claim)
    snapshot = _commit(storage, alice, sent[1].id, b"state", claim=second.claim)
    assert storage.finish_job(second.id, second.claim) is None
    assert [s.id for s in storage.list_snapshots(alice.id)] == [snapshot.id]
    assert storage.get_job(second.id).status == "done"
    with pytest.raises(LeaseLost):  # the job ended: no run holds it any more
        _commit(storage, alice, sent[1].id, b"again", claim=second.claim)


def test_a_job_taken_over_after_its_last_attempt_fails(storage, alice):
    job = storage.queue_job(alice.id)
    for _ in range(FAST.job_max_attempts):
        claimed = storage.claim_job()
        _lease_runs_out(storage, claimed.id)
    assert storage.claim_job() is None
    failed = storage.get_job(job.id)
    assert (failed.status, failed.attempts) == ("failed", FAST.job_max_attempts)
    assert failed.error.startswith("interrupted") and failed.lease_until is None
    assert storage.queue_job(alice.id).id != job.id


def test_jobs_left_running_by_a_crash_are_requeued(storage, alice, bob):
    a, b = storage.queue_job(alice.id), storage.queue_job(bob.id)
    storage.claim_job()
    storage.claim_job()
    with storage.engine.begin() as connection:
        connection.execute(update(CompressionJob).where(CompressionJob.id == b.id)
                           .values(started_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    assert storage.requeue_stale_jobs(started_before=datetime.now(timezone.utc)) == 1
    assert storage.get_job(a.id).status == "queued" and "interrupted" in storage.get_job(a.id).error
    assert storage.get_job(b.id).status == "running"
    assert storage.requeue_stale_jobs() == 1
    assert storage.get_job(b.id).status == "queued"
    assert storage.claim_job() is None  # a crash counts as a failed run: retried after the backoff
    with storage.engine.begin() as connection:
        connection.execute(update(CompressionJob).values(not_before=datetime.now(timezone.utc)))
    assert storage.claim_job().id == a.id and storage.get_job(a.id).attempts == 2


def test_a_crash_on_the_last_attempt_fails_the_job(storage, alice):
    job = storage.queue_job(alice.id)
    with storage.engine.begin() as connection:
        connection.execute(update(CompressionJob).values(attempts=FAST.job_max_attempts - 1))
    storage.claim_job()
    assert storage.requeue_stale_jobs() == 1
    assert storage.get_job(job.id).status == "failed"


def test_absorbing_marks_match_cursors(storage, alice):
    _, sent = _chat(storage, alice, *"abcdef")
    s1 = _commit(storage, alice, sent[2].id, b"1")
    s2 = _commit(storage, alice, sent[5].id, b"2")
    with storage.engine.connect() as connection:
        marks = dict(connection.execute(select(Message.id, Message.snapshot_id).order_by(Message.id)).all())
    assert list(marks.values()) == [s1.id] * 3 + [s2.id] * 3
