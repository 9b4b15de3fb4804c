"""Snapshot files: atomic durable writes, content addresses, checked reads, orphan removal."""

import hashlib
import os
import time

import pytest

from storage import SnapshotFileError
from storage.files import SnapshotFiles
from tests.storage.helpers import files_under


@pytest.fixture
def files(tmp_path):
    return SnapshotFiles(tmp_path / "data")


def test_a_file_is_named_by_its_sha256_in_its_users_folder(files):
    data = b"adapter state bytes"
    stored = files.write(7, data)
    digest = hashlib.sha256(data).hexdigest()
    assert stored.sha256 == digest and stored.size == len(data)
    assert stored.path == f"adapters/user-7/{digest}.state"
    assert (files.data_dir / stored.path).read_bytes() == data
    assert files_under(files.root) == [files.data_dir / stored.path]  # no temporary file left


def test_the_file_is_flushed_before_the_rename_and_the_folder_after(files, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src).startswith(".tmp-")))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write(1, b"first")
    # new folders are flushed into their parents, then: file data, rename, folder entry
    assert events[-3:] == [("fsync", "file"), ("replace", True), ("fsync", "dir")]
    assert events[:-3] and all(e == ("fsync", "dir") for e in events[:-3])
    events.clear()
    files.write(1, b"second")  # the folders exist now
    assert events == [("fsync", "file"), ("replace", True), ("fsync", "dir")]


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_a_failed_write_leaves_neither_a_partial_nor_a_temporary_file(files, monkeypatch, fail_at):
    old = files.write(1, b"old state")

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fail_at, broken)
    with pytest.raises(OSError, match="No space"):
        files.write(1, b"new state")
    monkeypatch.undo()
    assert files_under(files.root) == [files.data_dir / old.path]
    assert files.read(old.path, old.sha256, old.size) == b"old state"


def test_the_same_bytes_share_one_file(files):
    assert files.write(1, b"same") == files.write(1, b"same")
    assert len(files_under(files.root)) == 1


def test_reading_checks_the_bytes(files):
    stored = files.write(1, b"0123456789")
    assert files.read(stored.path, stored.sha256, stored.size) == b"0123456789"
    path = files.data_dir / stored.path
    path.write_bytes(b"0123456780")  # same size, one byte changed
    with pytest.raises(SnapshotFileError, match="failed its sha256 check"):
        files.read(stored.path, stored.sha256, stored.size)
    path.write_bytes(b"01234567")
    with pytest.raises(SnapshotFileError, match="failed its sha256 check"):
        files.read(stored.path, stored.sha256, stored.size)
    path.unlink()
    with pytest.raises(SnapshotFileError, match="is missing"):
        files.read(stored.path, stored.sha256, stored.size)


def test_a_path_outside_the_adapters_folder_is_refused(files, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    with pytest.raises(SnapshotFileError, match="outside"):
        files.read("../secret", hashlib.sha256(b"x").hexdigest(), 1)


def test_removing_a_user_removes_their_folder_only(files):
    files.write(1, b"a")
    kept = files.write(2, b"b")
    files.remove_user(1)
    files.remove_user(3)  # no folder: nothing to do
    assert not files.user_dir(1).exists()
    assert files_under(files.root) == [files.data_dir / kept.path]


def test_orphans_are_removed_once_old_enough(files):
    referenced = files.write(1, b"kept")
    orphan = files.write(1, b"orphan")
    leftover = files.user_dir(1) / ".tmp-crashed"
    leftover.write_bytes(b"half")
    gone_user = files.write(2, b"deleted user's")
    assert files.remove_orphans({referenced.path}, {1}, min_age_s=60) == []  # all too young
    old = time.time() - 120
    for path in files_under(files.root):
        os.utime(path, (old, old))
    removed = files.remove_orphans({referenced.path}, {1}, min_age_s=60)
    assert sorted(removed) == sorted([orphan.path, "adapters/user-1/.tmp-crashed", gone_user.path])
    assert files_under(files.root) == [files.data_dir / referenced.path]
    assert files.user_dir(1).exists() and not files.user_dir(2).exists()
