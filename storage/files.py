"""Adapter snapshot files: content-addressed, written atomically, checked on every read.

A file's name is the sha256 of its bytes, in a folder of its own per user, so that deleting the
user deletes the folder and nothing of theirs is left behind. A file is written to a temporary
name in the same folder, flushed to disk, renamed over its final name, and the folder itself is
flushed, so that after a crash a snapshot file is either whole or absent, never half written.

A user's memory is private: folders are 0700 and files 0600, whatever the umask, and a folder
found with looser bits is tightened before a file goes into it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .errors import SnapshotFileError

ADAPTERS_DIR = "adapters"
TMP_PREFIX = ".tmp-"
SUFFIX = ".state"
USER_DIR_PREFIX = "user-"
DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True)
class StoredFile:
    path: str
    """Relative to the data folder, with '/' separators: the value kept in the snapshot row."""
    sha256: str
    size: int


class SnapshotFiles:
    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.root = self.data_dir / ADAPTERS_DIR

    def user_dir(self, user_id: int) -> Path:
        return self.root / f"{USER_DIR_PREFIX}{int(user_id)}"

    def write(self, user_id: int, data: bytes) -> StoredFile:
        """Store the bytes durably; returns once they would survive a power cut."""
        digest = hashlib.sha256(data).hexdigest()
        folder = self.user_dir(user_id)
        make_private_dirs(folder)
        restrict_mode(self.root, DIR_MODE)
        restrict_mode(folder, DIR_MODE)
        final = folder / f"{digest}{SUFFIX}"
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 already, but said here rather than assumed
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
        return StoredFile(final.relative_to(self.data_dir).as_posix(), digest, len(data))

    def read(self, path: str, sha256: str, size: int) -> bytes:
        """The file's bytes, or SnapshotFileError if it is missing or not what was stored."""
        try:
            data = self._full_path(path).read_bytes()
        except FileNotFoundError as e:
            raise SnapshotFileError(f"adapter snapshot file {path} is missing") from e
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise SnapshotFileError(
                f"adapter snapshot file {path} failed its sha256 check: it was damaged or replaced")
        return data

    def remove(self, path: str) -> None:
        self._full_path(path).unlink(missing_ok=True)

    def remove_user(self, user_id: int) -> None:
        folder = self.user_dir(user_id)
        if folder.exists():
            shutil.rmtree(folder)
            _fsync_dir(folder.parent)

    def remove_orphans(self, referenced: Collection[str], users: Collection[int], min_age_s: float) -> list[str]:
        """Delete files no row refers to, and the emptied folders of users that no longer exist.

        Only files older than min_age_s go: a snapshot being committed right now has its file
        written before its row, and must not lose it in between. Returns the paths removed.
        """
        removed: list[str] = []
        if not self.root.exists():
            return removed
        cutoff = time.time() - min_age_s
        for folder in sorted(self.root.glob(f"{USER_DIR_PREFIX}*")):
            if not folder.is_dir():
                continue
            for file in sorted(folder.iterdir()):
                path = file.relative_to(self.data_dir).as_posix()
                if file.is_file() and path not in referenced and file.stat().st_mtime <= cutoff:
                    file.unlink()
                    removed.append(path)
            user_id = folder.name.removeprefix(USER_DIR_PREFIX)
            if not (user_id.isdigit() and int(user_id) in users) and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    def _full_path(self, path: str) -> Path:
        """A row's path made absolute; refused if it leads out of the adapters folder."""
        full = (self.data_dir / path).resolve()
        if not full.is_relative_to(self.root):
            raise SnapshotFileError(f"adapter snapshot path {path!r} lies outside {self.root}")
        return full


def make_private_dirs(folder: Path) -> None:
    """mkdir -p giving each new folder mode 0700, and flushing its parent so that the new entry
    itself is durable. Folders that were there already are left as they are."""
    missing = []
    parent = folder
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for created in reversed(missing):
        created.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(created, DIR_MODE)  # mkdir's mode passes through the umask
        _fsync_dir(created.parent)


def restrict_mode(path: Path, mode: int) -> None:
    """Take away the permission bits of `path` that `mode` does not have (0755 -> 0700 for 0700)."""
    current = stat.S_IMODE(os.stat(path).st_mode)
    if current & ~mode:
        os.chmod(path, current & mode)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
