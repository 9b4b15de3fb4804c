"""Files handed to their owner for a short time: data exports and admins' adapter exports.

A file is built in a private folder of the data folder (never the system's shared temp folder),
then kept in the database behind an unguessable link that only the owner's page is shown, so that
any web replica serves a link another one made. The link works only from the address that asked
for it, only while the owner's account exists, and only for a few minutes. A newer export of the
same user replaces the older one, and deleting a user, forgetting one of their messages or their
logging out deletes every copy at once, and refuses an export of theirs still being built (on any
replica: storage counts the revocations per user).
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from starlette.responses import Response

from storage import Storage

from .errors import AppError

log = logging.getLogger(__name__)

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


class LinkRevoked(AppError):
    """The owner logged out, or the data's owner was deleted or forgot it, while the file was made."""


class DownloadStore:
    def __init__(self, storage: Storage, folder: str | Path, ttl_s: float = 600.0) -> None:
        """folder: where files are built (private, emptied at start: builds a stopped process left)."""
        self.storage = storage
        self.folder = Path(folder)
        self.ttl_s = ttl_s
        self._closed = threading.Event()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(mode=0o700, parents=True)

    def add(self, owner_id: int, filename: str, write: Callable[[Path], None], address: str | None,
            subject_id: int | None = None) -> Download:
        """Build a file with `write(path)` and return its link; replaces the owner's older ones.

        Should the owner's or the subject's links be revoked while the file is built (a logout,
        a deletion, a forgotten message), on this replica or another, nothing is kept and
        LinkRevoked is raised instead."""
        subject_id = owner_id if subject_id is None else subject_id
        revisions = self.storage.downloads_revisions(owner_id, subject_id)
        scratch = self.scratch()
        try:
            path = scratch / "file"
            write(path)
            data = path.read_bytes()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        token = secrets.token_urlsafe(32)
        expires = datetime.now(timezone.utc) + timedelta(seconds=self.ttl_s)  # the one expiry, stored and shown
        download = Download(token, _safe_filename(filename), expires.timestamp())
        if not self.storage.add_download(token, owner_id, subject_id, address, download.filename, data, expires,
                                         revisions):
            raise LinkRevoked("That export was cancelled: its data changed or you logged out meanwhile")
        return download

    def scratch(self) -> Path:
        """A private folder for building a file (removed by the caller)."""
        return Path(tempfile.mkdtemp(prefix=".build-", dir=self.folder))  # mode 0700

    def find(self, token: str, address: str | None, owner_exists: Callable[[int], bool]) -> tuple[bytes, str] | None:
        """(bytes, filename) if the link is live for this address and its owner still exists."""
        link = self.storage.find_download(token, address)
        if link is None:
            return None
        if not owner_exists(link.owner_id):
            self.remove_user(link.owner_id)
            return None
        return link.data, link.filename

    def discard(self, token: str) -> None:
        """Delete one link (an export the API hands over in its response at once)."""
        self.storage.remove_download(token)

    def remove_user(self, user_id: int) -> None:
        """Delete every link the user holds and every file holding the user's data, and refuse
        those being built right now (their data may be out of date, or their owner gone)."""
        self.storage.revoke_downloads(user_id)

    def sweep(self) -> int:
        """Delete expired links; the number deleted."""
        return self.storage.remove_expired_downloads()

    def start_sweeping(self, every_s: float = 30.0) -> None:
        """Delete expired links in the background (a link is never served once expired anyway)."""
        def run() -> None:
            while not self._closed.wait(every_s):
                try:
                    self.sweep()
                except Exception:  # noqa: BLE001 - the database away for a moment: the next round retries
                    log.exception("sweeping expired download links failed")
        threading.Thread(target=run, name="download-sweeper", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        shutil.rmtree(self.folder, ignore_errors=True)


def _safe_filename(name: str) -> str:
    """ASCII letters, digits, '.', '-' and '_' only: it goes into a Content-Disposition header."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "download"


def zip_response(data: bytes, filename: str) -> Response:
    """An export's bytes as an attachment, for the download link and the API alike."""
    return Response(data, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff"})
