"""The background compression worker: one thread that absorbs users' new turns into their adapters.

Jobs live in the database, so they survive a restart: on start, jobs left running by a stopped
process are requeued (storage counts them as failed runs, retried with backoff). Several workers
(`--role worker`) claim jobs from one database; a job whose worker died is taken over once its
lease runs out. A failing job
is retried with exponential backoff and its error is shown on the memory and admin pages. What
a job does is app/memory.py's, the worker's only collaborator; the worker decides when.
"""

from __future__ import annotations

import logging
import threading
import time

from .errors import as_outage
from .memory import Memory

log = logging.getLogger(__name__)


class CompressionWorker:
    def __init__(self, memory: Memory, poll_seconds: float = 1.0, *, alone: bool = True):
        """alone: this is the only worker on its database (--role all), so jobs left running when it
        starts were its own last run's, requeued at once; beside other workers (--role worker) a
        job left running is taken over only once its lease runs out (Storage.claim_job)."""
        self.memory, self.poll_seconds, self.alone = memory, poll_seconds, alone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        requeued = self.memory.requeue_interrupted_jobs() if self.alone else 0
        if requeued:
            log.info("requeued %d compression job(s) interrupted by the last stop", requeued)
        self._thread = threading.Thread(target=self._run, name="compression-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as e:  # the worker must outlive any single failure
                if as_outage(e) is not None:  # the database restarts: wait for it, no traceback
                    log.warning("compression worker: %s (%s)", as_outage(e), type(e).__name__)
                else:
                    log.exception("compression worker step failed")
                busy = False
            if not busy:
                self._stop.wait(self.poll_seconds)

    def run_once(self) -> bool:
        """Queue idle users, then run at most one due job; True when a job ran."""
        self.memory.queue_idle(time.time())
        return self.memory.run_due_job()
