"""Nothing storage writes is readable by other local users: folders 0700, files 0600.

The process umask is cleared for these tests, so that the modes checked are the ones storage sets
itself rather than ones a cautious umask would have given anyway.
"""

import os
import sqlite3
import stat

import pytest

from storage import Storage, make_engine, upgrade
from storage.files import SnapshotFiles
from tests.storage.helpers import FAST, PASSWORD

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX permission bits")


@pytest.fixture(autouse=True)
def permissive_umask():
    previous = os.umask(0)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_data_folder_is_created_private(tmp_path):
    data = tmp_path / "deep" / "data"
    with Storage(data_dir=data, settings=FAST):
        assert _mode(data) == 0o700


def test_a_loose_data_folder_is_tightened(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    assert _mode(data) == 0o777
    with Storage(f"sqlite:///{tmp_path / 'elsewhere.db'}", data, FAST):
        assert _mode(data) == 0o700


def test_the_database_file_and_its_wal_are_private(tmp_path):
    data = tmp_path / "data"
    with Storage(data_dir=data, settings=FAST) as store:
        assert _mode(data / "memchat.db") == 0o600  # before anything was written
        store.migrate()
        store.create_user("alice", PASSWORD)
        with store.engine.connect():  # the WAL and shared-memory files exist while a connection is open
            for suffix in ("", "-wal", "-shm"):
                assert _mode(data / f"memchat.db{suffix}") == 0o600, suffix


def test_a_loose_database_file_is_tightened(tmp_path):
    path = tmp_path / "data" / "memchat.db"
    path.parent.mkdir(mode=0o700)
    sqlite3.connect(path).close()
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).touch()
        os.chmod(path.with_name(path.name + suffix), 0o666)
    with Storage(data_dir=path.parent, settings=FAST):
        for suffix in ("", "-wal", "-shm"):
            assert _mode(path.with_name(path.name + suffix)) == 0o600, suffix


def test_upgrade_alone_creates_a_private_database_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'memchat.db'}"
    upgrade(url, settings=FAST)
    assert _mode(tmp_path / "new") == 0o700
    assert _mode(tmp_path / "new" / "memchat.db") == 0o600
    make_engine(url).dispose()


def test_adapter_folders_and_snapshot_files_are_private(tmp_path):
    files = SnapshotFiles(tmp_path / "data")
    stored = files.write(7, b"adapter state")
    assert _mode(files.data_dir) == 0o700
    assert _mode(files.root) == 0o700
    assert _mode(files.user_dir(7)) == 0o700
    assert _mode(files.data_dir / stored.path) == 0o600


def test_loose_adapter_folders_are_tightened_on_the_next_write(tmp_path):
    files = SnapshotFiles(tmp_path / "data")
    files.write(7, b"first")
    os.chmod(files.root, 0o755)
    os.chmod(files.user_dir(7), 0o777)
    files.write(7, b"second")
    assert _mode(files.root) == _mode(files.user_dir(7)) == 0o700


def test_a_committed_snapshot_is_private(tmp_path):
    data = tmp_path / "data"
    with Storage(data_dir=data, settings=FAST) as store:
        store.migrate()
        user = store.create_user("alice", PASSWORD)
        conversation = store.start_conversation(user.id)
        message = store.append_message(user.id, conversation.id, "user", "hello", 1)
        snapshot = store.commit_snapshot(user.id, b"state", generator_id="g", base_model_id="m",
                                         cursor=message.id, tokens_absorbed=1)
    assert _mode(data / snapshot.path) == 0o600
    assert {_mode(folder) for folder in (data, data / "adapters", (data / snapshot.path).parent)} == {0o700}
