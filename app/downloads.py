"""Files handed to their owner for a short time: data exports and admins' adapter exports.

A file is written into the data folder (never the system's shared temp folder) with mode 0600 and
served at an unguessable link that only the owner's page is shown. The link works only from the
address that asked for it, only while the owner's account exists, and only for a few minutes;
then the file is deleted. A newer export of the same user replaces the older one, and deleting a
user, forgetting one of their messages or their logging out deletes every copy at once, and
refuses an export of theirs still being written.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import StreamingResponse

from .errors import AppError

ROUTE = "/downloads"
"""Where the web server serves these files: f'{ROUTE}/{token}'."""


@dataclass(frozen=True)
class Download:
    token: str
    filename: str
    """The name the browser saves it as."""
    expires_at: float
    """time.time() after which the link stops working and the file is deleted."""

    @property
    def url(self) -> str:
        """Relative to the page, so that it also works under a proxy's path prefix."""
        return f"{ROUTE.lstrip('/')}/{self.token}"


@dataclass(frozen=True)
class _Entry:
    download: Download
    owner_id: int
    """Who may download it."""
    subject_id: int
    """Whose data it holds (the owner's own, or a user an admin exported)."""
    address: str | None
    path: Path


class LinkRevoked(AppError):
    """The owner logged out, or the data's owner was deleted or forgot it, while the file was made."""


class DownloadStore:
    def __init__(self, folder: str | Path, ttl_s: float = 600.0) -> None:
        self.folder = Path(folder)
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}
        self._revocations: dict[int, int] = {}  # user -> how often their links were revoked
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # what a previous process left is unreachable (its links died with it): delete it
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(mode=0o700, parents=True)

    def add(self, owner_id: int, filename: str, write: Callable[[Path], None], address: str | None,
            subject_id: int | None = None) -> Download:
        """Write a file with `write(path)` and return its link; replaces the owner's older ones.

        Should the owner's or the subject's links be revoked while the file is written (a logout,
        a deletion, a forgotten message), the file is deleted and LinkRevoked raised instead."""
        subject_id = owner_id if subject_id is None else subject_id
        with self._lock:
            before = self._revoked(owner_id, subject_id)
        token = secrets.token_urlsafe(32)
        path = self.folder / token
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from the start
        os.close(fd)
        try:
            write(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        download = Download(token, _safe_filename(filename), time.time() + self.ttl_s)
        entry = _Entry(download, owner_id, subject_id, address, path)
        with self._lock:
            revoked = self._revoked(owner_id, subject_id) != before
            replaced = [] if revoked else self._take(lambda e: e.owner_id == owner_id)
            if not revoked:
                self._entries[token] = entry
        _delete([entry] if revoked else replaced)
        if revoked:
            raise LinkRevoked("That export was cancelled: its data changed or you logged out meanwhile")
        self.sweep()
        return download

    def _take(self, matches: Callable[[_Entry], bool]) -> list[_Entry]:
        """Remove the matching entries from the table (the caller holds the lock) and return them."""
        tokens = [t for t, e in self._entries.items() if matches(e)]
        return [self._entries.pop(t) for t in tokens]

    def _revoked(self, *user_ids: int) -> tuple[int, ...]:
        return tuple(self._revocations.get(u, 0) for u in user_ids)

    def scratch(self) -> Path:
        """A private folder for building a file (removed by the caller)."""
        return Path(tempfile.mkdtemp(prefix=".build-", dir=self.folder))  # mode 0700

    def find(self, token: str, address: str | None, owner_exists: Callable[[int], bool]) -> tuple[Path, str] | None:
        """(path, filename) if the link is live for this address and its owner still exists."""
        self.sweep()
        with self._lock:
            entry = self._entries.get(token)
        if entry is None or (entry.address is not None and entry.address != address):
            return None
        if not owner_exists(entry.owner_id):
            self.remove_user(entry.owner_id)
            return None
        return entry.path, entry.download.filename

    def discard(self, token: str) -> None:
        """Delete one link and its file (an export the API hands over in its response at once)."""
        with self._lock:
            gone = self._take(lambda e: e.download.token == token)
        _delete(gone)

    def remove_user(self, user_id: int) -> None:
        """Delete every link the user holds and every file holding the user's data, and refuse
        those being written right now (their data may be out of date, or their owner gone)."""
        with self._lock:
            self._revocations[user_id] = self._revocations.get(user_id, 0) + 1
            gone = self._take(lambda e: user_id in (e.owner_id, e.subject_id))
        _delete(gone)

    def sweep(self, now: float | None = None) -> int:
        """Delete expired files; the number deleted."""
        now = time.time() if now is None else now
        with self._lock:
            expired = self._take(lambda e: e.download.expires_at <= now)
        _delete(expired)
        return len(expired)

    def start_sweeping(self, every_s: float = 30.0) -> None:
        """Delete expired files in the background too, not only when a link is used."""
        def run() -> None:
            while not self._closed.wait(every_s):
                self.sweep()
        threading.Thread(target=run, name="download-sweeper", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._entries.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def _delete(entries: list[_Entry]) -> None:
    """Their files (outside the lock: a slow disk must not hold up the table)."""
    for entry in entries:
        entry.path.unlink(missing_ok=True)


def _safe_filename(name: str) -> str:
    """ASCII letters, digits, '.', '-' and '_' only: it goes into a Content-Disposition header."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "download"


def zip_response(handle, filename: str) -> StreamingResponse:
    """An open export file streamed as an attachment (the file may be deleted meanwhile: an open
    file stays readable), for the download link and the API alike."""
    size = os.fstat(handle.fileno()).st_size

    def chunks():
        with handle:
            while chunk := handle.read(1 << 16):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(size),
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
