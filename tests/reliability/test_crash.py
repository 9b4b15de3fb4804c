"""SIGKILL during compression: afterwards every message is there exactly once, every snapshot
file matches its checksum, and the interrupted compression finishes.

MEMCHAT_CRASH_TRIALS sets the number of kills (default 20)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from adapter_core.serving.scheduler import InferenceLoop
from app.services import Services
from app.settings import AppSettings
from app.worker import CompressionWorker
from storage import Storage, StorageSettings, upgrade
from storage.models import CompressionJob, Message
from tests.conftest import byte_tokenizer, tiny_text_engine

CRASH_SETTINGS = StorageSettings(argon2_time_cost=1, argon2_memory_cost_kib=8, argon2_parallelism=1,
                                 job_max_attempts=1000, job_retry_base_s=0.0, job_retry_max_s=0.0)
WORKER = Path(__file__).with_name("crash_worker.py")
USERS, MESSAGES_PER_ROUND = 4, 12


def jobs(storage: Storage, status: str) -> int:
    with storage.engine.connect() as connection:
        return len(connection.execute(select(CompressionJob.id).where(CompressionJob.status == status)).all())


def add_turns(storage: Storage, users: list[int], conversations: dict[int, int], rng: random.Random) -> int:
    added = 0
    for user_id in users:
        for i in range(MESSAGES_PER_ROUND):
            words = " ".join(rng.choice(["tea", "cat", "Quenmoor", "blue", "train", "walnut", "4821"])
                             for _ in range(rng.randint(20, 60)))
            storage.append_message(user_id, conversations[user_id], "user" if i % 2 == 0 else "assistant", words, 0)
            added += 1
        storage.queue_job(user_id)
    return added


@pytest.fixture
def crash_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'memchat.db'}"
    upgrade(url, settings=CRASH_SETTINGS)
    with Storage(url, tmp_path / "data", CRASH_SETTINGS) as store:
        yield url, tmp_path / "data", store


def test_sigkill_during_compression_loses_nothing(crash_storage):
    url, data_dir, storage = crash_storage
    trials = int(os.environ.get("MEMCHAT_CRASH_TRIALS", "20"))
    rng = random.Random(1234)
    users = [storage.create_user(f"user{i}", "crash test password").id for i in range(USERS)]
    conversations = {u: storage.start_conversation(u).id for u in users}
    sent, killed_while_running, committed_before_kill = 0, 0, 0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for _ in range(trials):
        sent += add_turns(storage, users, conversations, rng)
        done_before = jobs(storage, "done")
        process = subprocess.Popen([sys.executable, str(WORKER), url, str(data_dir)], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, env=env, text=True)
        try:
            assert process.stdout.readline().strip() == "ready"
            # let 0 to 3 of this round's jobs finish, then kill inside a running one
            wanted_done, deadline = done_before + rng.randint(0, USERS - 1), time.monotonic() + 60
            while time.monotonic() < deadline and not (
                    jobs(storage, "done") >= wanted_done and jobs(storage, "running") > 0):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
            killed_while_running += jobs(storage, "running") > 0
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    committed_before_kill = sum(len(storage.list_snapshots(u)) for u in users)

    # restart: the same code as the app's start (the worker requeues what the kills interrupted)
    engine = tiny_text_engine(byte_tokenizer(), live=True)
    with InferenceLoop(engine) as loop:
        services = Services.create(storage, engine, loop, AppSettings(
            data_dir=data_dir, compressor="generator", compress_idle_seconds=0))  # commits alike, the cheap pass
        services.memory.requeue_interrupted_jobs()
        worker = CompressionWorker(services.memory)
        while worker.run_once():
            pass

    with storage.engine.connect() as connection:
        ids = [row[0] for row in connection.execute(select(Message.id))]
        unabsorbed = connection.execute(select(Message.id).where(Message.snapshot_id.is_(None))).all()
        statuses = {row[0] for row in connection.execute(select(CompressionJob.status))}
    assert len(ids) == len(set(ids)) == sent  # every message exactly once
    assert unabsorbed == [] and statuses <= {"done"}  # the pending compressions finished
    for user_id in users:
        snapshots = storage.list_snapshots(user_id)
        assert snapshots[-1].cursor == storage.history(user_id)[-1].id
        for snapshot in snapshots:
            storage.read_snapshot(user_id, snapshot.id)  # raises if a file does not match its checksum
    storage.remove_orphan_files(min_age_s=0)
    on_disk = sorted(p.relative_to(data_dir).as_posix() for p in (data_dir / "adapters").rglob("*") if p.is_file())
    referenced = sorted(s.path for u in users for s in storage.list_snapshots(u))
    assert on_disk == referenced
    print(f"\n{trials} SIGKILLs, {killed_while_running} during a running compression, {committed_before_kill} "
          f"snapshots committed between kills; {sent} messages, all present once and absorbed after restart; "
          f"{len(referenced)} snapshot files verified")
    assert killed_while_running >= trials / 2
