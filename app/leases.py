"""Leases that a process keeps while it works: a compression job (app/memory.py) and, between web
replicas, a user's running turn (app/chat.py). The database holds each until a time; the holder
renews it every third of its length while the work goes on, so that a process that dies gives it
up within one lease, and one that lives never loses it to another."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def renewing(renew: Callable[[], bool], lease_s: float, what: str) -> Iterator[threading.Event]:
    """Call renew() every lease_s / 3 while the block runs, until it returns False (the lease was
    lost: taken over, or ended), which sets the event the block gets, so that it can stop work
    nobody will keep; a renewal that raises (the database away for a moment) is tried again at the
    next beat."""
    stop, lost = threading.Event(), threading.Event()

    def beat() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if not renew():
                    lost.set()
                    log.warning("%s: its lease was lost", what)
                    return
            except Exception:  # noqa: BLE001 - logged; the next beat tries again
                log.exception("%s: renewing its lease failed", what)

    renewer = threading.Thread(target=beat, name=f"lease: {what}", daemon=True)
    renewer.start()
    try:
        yield lost
    finally:
        stop.set()
        renewer.join()
