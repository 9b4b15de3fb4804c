"""What the schema itself guarantees, whatever code writes to it."""

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from storage.models import AdapterSnapshot, CompressionJob, Conversation, Message, User
from tests.storage.helpers import PASSWORD


def _session(storage) -> Session:
    return Session(storage.engine)


def test_times_come_back_timezone_aware_in_utc(storage):
    before = datetime.now(timezone.utc)
    user = storage.create_user("alice", PASSWORD)
    created = storage.get_user(user.id).created_at
    assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) <= created <= datetime.now(timezone.utc)


def test_a_time_in_another_zone_is_stored_as_the_same_instant(storage, alice):
    tokyo = datetime(2030, 1, 2, 9, 0, tzinfo=timezone(timedelta(hours=9)))
    with _session(storage) as session, session.begin():
        session.add(CompressionJob(user_id=alice.id, not_before=tokyo))
    with _session(storage) as session:
        stored = session.scalars(select(CompressionJob.not_before)).one()
    assert stored == tokyo and stored.utcoffset() == timedelta(0) and stored.hour == 0


def test_a_naive_time_is_refused(storage, alice):
    with _session(storage) as session, session.begin():
        session.add(CompressionJob(user_id=alice.id, not_before=datetime(2030, 1, 1)))
        with pytest.raises(StatementError, match="naive datetime"):
            session.flush()


def test_deleting_a_user_row_cascades_in_the_database(storage, alice, bob):
    conversation = storage.start_conversation(alice.id)
    storage.append_message(alice.id, conversation.id, "user", "hi", 1)
    storage.queue_job(alice.id)
    bob_conversation = storage.start_conversation(bob.id)
    with _session(storage) as session, session.begin():
        session.execute(delete(User).where(User.id == alice.id))  # plain SQL: no code of ours runs
    with _session(storage) as session:
        assert session.scalar(select(func.count()).select_from(Conversation)) == 1
        assert session.scalar(select(func.count()).select_from(Message)) == 0
        assert session.scalar(select(func.count()).select_from(CompressionJob)) == 0
        assert session.scalars(select(Conversation.id)).one() == bob_conversation.id


def test_a_message_cannot_sit_in_another_users_conversation(storage, alice, bob):
    conversation = storage.start_conversation(alice.id)
    with _session(storage) as session, session.begin():
        session.add(Message(user_id=bob.id, conversation_id=conversation.id, role="user", text="x", token_count=1))
        with pytest.raises(IntegrityError):
            session.flush()


def test_roles_are_checked_by_the_database(storage, alice):
    conversation = storage.start_conversation(alice.id)
    with _session(storage) as session, session.begin():
        session.add(Message(user_id=alice.id, conversation_id=conversation.id, role="system", text="x",
                            token_count=1))
        with pytest.raises(IntegrityError):
            session.flush()


def test_one_active_job_per_user_is_enforced_by_the_database(storage, alice):
    with _session(storage) as session, session.begin():
        session.add(CompressionJob(user_id=alice.id, status="running"))
    with _session(storage) as session, session.begin():
        session.add(CompressionJob(user_id=alice.id, status="done"))  # finished jobs do not count
    with _session(storage) as session, session.begin():
        session.add(CompressionJob(user_id=alice.id, status="queued"))
        with pytest.raises(IntegrityError):
            session.flush()


def test_snapshot_versions_are_unique_per_user(storage, alice, bob):
    row = dict(version=1, generator_id="g", base_model_id="m", path="p", sha256="0" * 64, size_bytes=1,
               cursor=0, tokens_absorbed=0, stats={})
    with _session(storage) as session, session.begin():
        session.execute(insert(AdapterSnapshot), [dict(row, user_id=alice.id), dict(row, user_id=bob.id)])
    with _session(storage) as session, session.begin():
        with pytest.raises(IntegrityError):
            session.execute(insert(AdapterSnapshot), [dict(row, user_id=alice.id)])


def test_message_ids_are_never_reused(storage, alice):
    conversation = storage.start_conversation(alice.id)
    first = storage.append_message(alice.id, conversation.id, "user", "one", 1)
    storage.delete_message(alice.id, first.id)
    second = storage.append_message(alice.id, conversation.id, "user", "two", 1)
    assert second.id > first.id
