"""Memory: what each user's adapter holds, and how their turns get into it.

The memory tab's actions (status, compress now, forget), the compression the background worker
runs (app/worker.py talks to nothing else), the per-user cache of adapter states, and what
happens when a snapshot file cannot be used. Compressing new turns and rebuilding from the whole
history are one code path (`_absorb`): a rebuild is absorbing every message into an empty state.
Absorbing runs on the inference loop (adapter_core.serving.scheduler), in slices between decode steps,
so that compression never holds up a reply for long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from adapter_core import AdapterState, GenerativeAdapterModel, StateError
from adapter_core.data.conversation import Turn, history_text
from adapter_core.memory.compressor import Compressor, make_compressor
from adapter_core.memory.finetune import replay_sample
from adapter_core.serving.scheduler import InferenceLoop
from storage import CursorError, JobClaim, LeaseLost, MemorySummary, NotFound, RebuildRequired, SnapshotFileError, TurnStart
from storage.models import AdapterSnapshot, CompressionJob, Message, User

from .access import Access, chosen_id
from .downloads import DownloadStore
from .errors import AccessDenied, Gone, refusing
from .leases import renewing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobStatus:
    """The user's queued or running compression."""

    status: str
    """'queued' or 'running'."""
    attempts: int
    error: str | None
    """Why the last attempt failed, if it did (for admins; users are told only that it failed)."""
    not_before: datetime
    """When the next attempt may start (after a failure: the retry's backoff)."""

    @classmethod
    def of(cls, job: CompressionJob) -> JobStatus:
        return cls(job.status, job.attempts, job.error, job.not_before)


def built_by(snapshot: AdapterSnapshot) -> str:
    """The compressor that built a snapshot (those made before the fine-tuning one were the generator's)."""
    return snapshot.stats.get("compressor", "generator")


def new_tokens(snapshot: AdapterSnapshot) -> int | None:
    """Tokens its compression trained on or absorbed (a rebuild: the whole history)."""
    return snapshot.stats.get("new_tokens", snapshot.stats.get("tokens"))


@dataclass(frozen=True)
class CompressionProgress:
    """How far the user's running compression is."""

    steps_done: int
    steps: int
    """Steps in all (the fine-tuning's optimizer steps; the generator's pass is one); 0 while it
    prepares (waits for the inference loop, reads the turns)."""
    seconds: float
    """Since it started."""

    @property
    def seconds_left(self) -> float | None:
        """At the pace so far (None before the first step is done)."""
        if not self.steps_done:
            return None
        return self.seconds / self.steps_done * (self.steps - self.steps_done)


@dataclass(frozen=True)
class _Running:
    """A compression of this process, as its progress callback last left it."""

    started: float
    """time.monotonic() at its start."""
    steps_done: int = 0
    steps: int = 0


@dataclass(frozen=True)
class MemoryStatus:
    messages: int
    absorbed_messages: int
    absorbed_tokens: int
    pending_messages: int
    pending_tokens: int
    adapter_version: int | None
    last_compression: datetime | None
    needs_rebuild: bool
    """A message was forgotten (or the adapter file was damaged): answers use no adapter until rebuilt."""
    job: JobStatus | None
    compressor: str | None = None
    """What built the latest adapter: 'finetune' or 'generator' (None: no adapter yet)."""
    compression_tokens: int | None = None
    """Tokens the latest compression trained on or absorbed (new turns; a rebuild: the whole history)."""
    compression_seconds: float | None = None
    progress: CompressionProgress | None = None
    """The compression running now, if one is (in this process)."""

    @classmethod
    def of(cls, summary: MemorySummary) -> MemoryStatus:
        counts, snapshot, job = summary.counts, summary.snapshot, summary.job
        stats = snapshot.stats if snapshot else {}
        return cls(counts.messages, counts.absorbed_messages, counts.absorbed_tokens, counts.pending_messages,
                   counts.pending_tokens, snapshot.version if snapshot else None,
                   snapshot.created_at if snapshot else None, summary.user.needs_rebuild,
                   JobStatus.of(job) if job else None, built_by(snapshot) if snapshot else None,
                   new_tokens(snapshot) if snapshot else None, stats.get("seconds"))


class Memory:
    def __init__(self, access: Access, engine: GenerativeAdapterModel, loop: InferenceLoop,
                 downloads: DownloadStore, compressor: Compressor | None = None) -> None:
        self.access, self.engine, self.loop, self.downloads = access, engine, loop, downloads
        self.storage, self.settings = access.storage, access.settings
        self.compressor = compressor or make_compressor(self.settings.compressor, engine)
        """What writes users' turns into their adapters (--compressor); another one's snapshots are rebuilt."""
        self._states: dict[int, tuple[int, AdapterState]] = {}  # user -> (snapshot id, its state)
        self._states_lock = threading.Lock()
        self._running: dict[int, _Running] = {}  # user -> their compression's progress (one assignment a step)

    # --- the memory tab ----------------------------------------------------------------------------

    def status(self, user_id: object) -> MemoryStatus:
        """One read of the database, and one of the page's login: this runs on a timer for every open page."""
        try:
            return self.status_of(self.storage.memory_summary(self.access.user_id(user_id)))
        except NotFound:
            raise AccessDenied("Please log in") from None

    def status_of(self, summary: MemorySummary) -> MemoryStatus:
        """The summary as the memory tab and the admin page show it, with the running compression's progress."""
        running = self._running.get(summary.user.id)
        if running is None:
            return MemoryStatus.of(summary)
        progress = CompressionProgress(running.steps_done, running.steps, time.monotonic() - running.started)
        return replace(MemoryStatus.of(summary), progress=progress)

    def compress_now(self, user_id: object) -> None:
        user = self.access.user(user_id)
        self.access.costly(user.id)
        self.storage.queue_job(user.id)

    def forget(self, user_id: object, message_id: object) -> int:
        """Delete one of the user's messages and, for a message of theirs, the reply to it; until
        the rebuild lands, answers use no adapter (it may hold them). The number deleted."""
        user = self.access.user(user_id)
        chosen = chosen_id("message", message_id)
        if chosen is None:
            raise Gone()
        with refusing():  # another user's message is NotFound, exactly like one that does not exist
            deleted = self.storage.delete_message(user.id, chosen, with_reply=True)
        self.drop_state(user.id)
        self.downloads.remove_user(user.id)  # an export made before holds what was forgotten
        self.storage.queue_job(user.id)
        return len(deleted)

    def forget_everything(self, user_id: object) -> None:
        """Delete all the user's messages and adapters, keeping the account (and its API keys);
        audited as the user's own reset."""
        user = self.access.user(user_id)
        try:
            self.storage.reset_memory(user.id, actor_id=user.id)
        except NotFound:  # deleted meanwhile
            raise AccessDenied("Please log in") from None
        self.drop_state(user.id)
        self.downloads.remove_user(user.id)  # an export made before holds it all

    # --- adapter states ------------------------------------------------------------------------------

    def answer_context(self, turn: TurnStart) -> tuple[AdapterState | None, tuple[Message, ...]]:
        """What a turn is answered with: the adapter state (None: the base model) and the earlier
        messages the prompt must hold because that state does not."""
        snapshot = turn.snapshot
        if snapshot is None or turn.needs_rebuild:
            return None, turn.pending
        try:
            return self._state(turn.message.user_id, snapshot), turn.pending
        except (SnapshotFileError, StateError) as e:
            history = self._report_unusable(turn.message.user_id, snapshot, e)
            return None, tuple(m for m in history if m.id < turn.message.id)

    def usable_state(self, user: User) -> tuple[AdapterSnapshot | None, AdapterState | None]:
        """The user's latest snapshot and its state; the state is None when there is no usable one:
        none yet, a rebuild pending (it may hold forgotten messages), or a damaged file."""
        snapshot = self.storage.latest_snapshot(user.id)
        if snapshot is None or user.needs_rebuild:
            return snapshot, None
        try:
            return snapshot, self._state(user.id, snapshot)
        except (SnapshotFileError, StateError) as e:
            self._report_unusable(user.id, snapshot, e)
            return snapshot, None

    def drop_state(self, user_id: int) -> None:
        """Forget the cached state (its snapshot is about to be replaced or deleted)."""
        with self._states_lock:
            self._states.pop(user_id, None)

    def _state(self, user_id: int, snapshot: AdapterSnapshot) -> AdapterState:
        """The snapshot's state, from the cache or its file; SnapshotFileError or StateError if unusable."""
        with self._states_lock:
            cached = self._states.get(user_id)
        if cached is not None and cached[0] == snapshot.id:
            return cached[1]
        state = AdapterState.from_bytes(self.storage.read_snapshot_file(snapshot), self.compressor.id,
                                        self.engine.base_model_id)
        self._keep_state(user_id, snapshot.id, state)
        return state

    def _keep_state(self, user_id: int, snapshot_id: int, state: AdapterState) -> None:
        with self._states_lock:
            self._states[user_id] = (snapshot_id, state)

    def _report_unusable(self, user_id: int, snapshot: AdapterSnapshot, error: Exception) -> list[Message]:
        """A snapshot that cannot be used: storage records it once (audit log, shown on the admin
        page) and queues a rebuild from the history; answers use no adapter meanwhile. The user's
        whole history, which answers must then show instead. A snapshot made by another compressor
        or other settings (--compressor changed, or an upgrade changed how adapters are trained) is
        outdated, not damaged: said so, in the log's ordinary level."""
        if (snapshot.generator_id, snapshot.base_model_id) != (self.compressor.id, self.engine.base_model_id):
            log.info("user %s: adapter v%s was made by %s; rebuilding it with %s", user_id, snapshot.version,
                     snapshot.generator_id, self.compressor.id)
            return self.storage.report_unusable_snapshot(
                user_id, snapshot.id, {"made_by": snapshot.generator_id, "now": self.compressor.id}, "adapter_outdated")
        log.warning("user %s: adapter snapshot v%s unusable (%s); answering without it until rebuilt", user_id,
                    snapshot.version, error)
        return self.storage.report_unusable_snapshot(user_id, snapshot.id, {"error": str(error)[:300]})

    # --- compression (the worker's side) -----------------------------------------------------------

    def requeue_interrupted_jobs(self) -> int:
        """Jobs a stopped process left running count as failed runs (retried with backoff)."""
        return self.storage.requeue_stale_jobs()

    def queue_idle(self, now_ts: float) -> list[int]:
        """Queue compression for users whose newest pending message is older than the idle delay."""
        if not self.settings.compress_idle_seconds:
            return []
        queued = []
        for user_id, _count, newest in self.storage.pending_users():
            if (now_ts - newest.timestamp() >= self.settings.compress_idle_seconds
                    and self.storage.active_job(user_id) is None):
                self.storage.queue_job(user_id)
                queued.append(user_id)
        return queued

    def run_due_job(self) -> bool:
        """Claim the oldest due compression job (or one whose worker died) and run it, renewing its
        lease while it runs; False when none was due. A failure is recorded on the job (retried with
        backoff, its error shown on the memory and admin pages). A run whose lease was lost (this
        process stalled past it and another worker took the job over) stores nothing."""
        job = self.storage.claim_job()
        if job is None:
            return False
        started = time.perf_counter()
        try:
            with renewing(lambda: self.storage.renew_lease(job.claim), self.storage.settings.job_lease_s,
                          f"compression job {job.id}"):
                version = self.compress(job.user_id, job.claim)
        except LeaseLost as e:
            log.warning("compression job %s for user %s: %s", job.id, job.user_id, e)
            return True
        except Exception as e:  # any failure of one job is that job's, never the worker's
            log.exception("compression job %s for user %s failed", job.id, job.user_id)
            try:
                self.storage.fail_job(job.id, f"{type(e).__name__}: {e}", job.claim)
            except LeaseLost:
                pass  # another worker runs it now
            return True
        try:
            self.storage.finish_job(job.id, job.claim)
        except LeaseLost as e:  # its snapshot was stored: the worker that took over finds nothing new
            log.warning("compression job %s for user %s: %s", job.id, job.user_id, e)
        log.info("user %s: adapter v%s in %.1f s", job.user_id, version, time.perf_counter() - started)
        return True

    def compress(self, user_id: int, claim: JobClaim | None = None) -> int | None:
        """Absorb the user's new turns (or rebuild from scratch when needed); the new version or None.
        claim: the job's run this is (its commit is refused once that run lost the job)."""
        user = self.storage.get_user(user_id)
        snapshot, state = self.usable_state(user)
        if user.needs_rebuild or (snapshot is not None and state is None):
            return self._rebuild(user, claim)
        pending = self.storage.messages_after(user_id, snapshot.cursor if snapshot else 0)
        if not pending:
            return None
        try:
            return self._absorb(user_id, state, pending, self._replay(user_id, snapshot), claim=claim)
        except RebuildRequired:  # a message was forgotten meanwhile, or another generator made the snapshot
            return self._rebuild(self.storage.get_user(user_id), claim)
        except CursorError:  # another compression absorbed these turns first: nothing left to do
            log.info("user %s: turns up to %s were already absorbed", user_id, pending[-1].id)
            return None

    def _rebuild(self, user: User, claim: JobClaim | None = None) -> int:
        """The adapter anew from the whole history. The user row was read before the history, so a
        message deleted in between makes the commit refuse (its revision moved on)."""
        return self._absorb(user.id, None, self.storage.history(user.id), rebuild_revision=user.history_revision,
                            claim=claim)

    def _replay(self, user_id: int, snapshot: AdapterSnapshot | None) -> list[str]:
        """Earlier turns the compressor trains again with the new ones (see FinetuneCompressor): a
        seeded sample of what the snapshot holds, its size bounded; none for the generator."""
        tokens = self.compressor.replay_tokens
        if not tokens or snapshot is None:
            return []
        earlier = [m for m in self.storage.history(user_id) if m.id <= snapshot.cursor]
        turns = [history_text([Turn(m.role, m.text)]) for m in earlier]
        return replay_sample(turns, tokens, self.engine.tokenizer, seed=snapshot.version)

    def _absorb(self, user_id: int, state: AdapterState | None, messages: Sequence[Message],
                replay: Sequence[str] = (), rebuild_revision: int | None = None, claim: JobClaim | None = None) -> int:
        """Absorb the messages into the state (None: an empty one), replaying earlier turns where
        the compressor wants them, and commit the result as the user's new snapshot, a rebuild
        when a revision is given; the new version."""
        started = time.perf_counter()
        begun = time.monotonic()
        self._running[user_id] = _Running(begun)

        def progress(done: int, steps: int) -> None:  # in the inference loop's thread: one assignment
            self._running[user_id] = _Running(begun, done, steps)

        try:
            new = self.loop.absorb(state or self.compressor.empty_state(),
                                   history_text([Turn(m.role, m.text) for m in messages]), self.compressor, replay,
                                   progress)
        finally:
            self._running.pop(user_id, None)
        stats = {"compressor": self.compressor.name, "tokens": new.tokens, "windows": new.windows,
                 "messages": len(messages), "new_tokens": new.tokens - (state.tokens if state else 0),
                 "replayed_turns": len(replay), "seconds": round(time.perf_counter() - started, 3),
                 "state_bytes": new.nbytes()}
        if rebuild_revision is not None:
            stats["rebuild"] = True
        snapshot = self.storage.commit_snapshot(
            user_id, new.to_bytes(), generator_id=self.compressor.id, base_model_id=self.engine.base_model_id,
            cursor=messages[-1].id if messages else 0, tokens_absorbed=new.tokens, stats=stats,
            rebuild_revision=rebuild_revision, claim=claim)
        self._keep_state(user_id, snapshot.id, new)
        return snapshot.version

