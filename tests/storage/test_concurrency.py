"""Writers and compressors at once: no message is lost, none is absorbed twice."""

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from storage.models import CompressionJob
from tests.storage.helpers import PASSWORD

USERS = 3
WRITERS = 4
MESSAGES_PER_WRITER = 20
COMPRESSORS = 2


def test_no_message_is_lost_or_absorbed_twice(storage):
    users = [storage.create_user(f"user{i}", PASSWORD).id for i in range(USERS)]
    conversations = {user_id: storage.start_conversation(user_id).id for user_id in users}
    appended: list[tuple[int, int]] = []
    writers_done = threading.Event()
    running: set[int] = set()
    overlaps: list[int] = []
    lock = threading.Lock()

    def write(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(MESSAGES_PER_WRITER):
            user_id = rng.choice(users)
            message = storage.append_message(user_id, conversations[user_id], "user", f"writer {seed} #{i}", 3)
            appended.append((user_id, message.id))
            storage.queue_job(user_id)

    def compress() -> int:
        idle_after_writers = 0
        commits = 0
        while idle_after_writers < 3:
            job = storage.claim_job()
            if job is None:
                idle_after_writers += writers_done.is_set()
                time.sleep(0.01)
                continue
            with lock:
                if job.user_id in running:
                    overlaps.append(job.user_id)
                running.add(job.user_id)
            latest = storage.latest_snapshot(job.user_id)
            new = storage.messages_after(job.user_id, latest.cursor if latest else 0)
            if new:
                ids = [m.id for m in new]
                storage.commit_snapshot(job.user_id, json.dumps(ids).encode(), generator_id="g", base_model_id="m",
                                        cursor=ids[-1], tokens_absorbed=3 * len(ids))
                commits += 1
            with lock:
                running.discard(job.user_id)  # before finishing: its follow-up may be claimed at once
            storage.finish_job(job.id)
        return commits

    with ThreadPoolExecutor(WRITERS + COMPRESSORS) as pool:
        compressors = [pool.submit(compress) for _ in range(COMPRESSORS)]
        writers = [pool.submit(write, seed) for seed in range(WRITERS)]
        for future in writers:
            future.result()
        writers_done.set()
        commits = sum(future.result() for future in compressors)

    assert overlaps == [], "a user had two running jobs at once"
    assert commits > USERS  # the compressors really ran alongside the writers
    message_ids = [message_id for _, message_id in appended]
    assert len(message_ids) == len(set(message_ids)) == WRITERS * MESSAGES_PER_WRITER
    with storage.engine.connect() as connection:
        statuses = set(connection.scalars(select(CompressionJob.status)))
    assert statuses == {"done"}

    absorbed_by: dict[int, int] = {}
    for user_id in users:
        history = storage.history(user_id)
        assert sorted(m.id for m in history) == sorted(mid for uid, mid in appended if uid == user_id)
        previous = 0
        for snapshot in storage.list_snapshots(user_id):
            assert snapshot.cursor > previous  # cursors strictly increase
            ids = json.loads(storage.read_snapshot(user_id, snapshot.id))
            assert ids == [m.id for m in history if previous < m.id <= snapshot.cursor]
            for message_id in ids:
                assert message_id not in absorbed_by, f"message {message_id} absorbed twice"
                absorbed_by[message_id] = snapshot.id
            previous = snapshot.cursor
        assert {m.id: m.snapshot_id for m in history} == {m.id: absorbed_by.get(m.id) for m in history}
    assert sorted(absorbed_by) == sorted(message_ids)  # every message absorbed, exactly once


def test_a_users_messages_commit_in_id_order(storage, alice):
    """Why append_message locks the user: if a smaller id could commit after a larger one, a reader
    would move the cursor past the first message before it was visible, and never absorb it."""
    conversation = storage.start_conversation(alice.id)
    flushed, release = threading.Event(), threading.Event()
    first: list = []

    def hold_the_first_commit(session, context):
        if threading.current_thread().name == "first":
            flushed.set()
            assert release.wait(10)

    event.listen(Session, "after_flush", hold_the_first_commit)
    try:
        thread = threading.Thread(name="first", target=lambda: first.append(
            storage.append_message(alice.id, conversation.id, "user", "first", 1)))
        thread.start()
        assert flushed.wait(10)  # the first message has its id, and is not committed
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(storage.append_message, alice.id, conversation.id, "user", "second", 1)
            time.sleep(0.5)
            assert not second.done(), "the second message committed while the first was pending"
            assert storage.messages_after(alice.id, 0) == []
            release.set()
            thread.join(10)
            assert second.result(10).id > first[0].id
    finally:
        release.set()
        event.remove(Session, "after_flush", hold_the_first_commit)
    assert [m.text for m in storage.messages_after(alice.id, 0)] == ["first", "second"]
