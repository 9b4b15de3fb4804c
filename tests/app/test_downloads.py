import stat
import time
from pathlib import Path

import pytest

from app.downloads import DownloadStore, LinkRevoked


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write(text: str):
    return lambda path: path.write_text(text)


def test_files_are_private_and_found_only_by_their_owner_s_address(tmp_path):
    store = DownloadStore(tmp_path / "downloads")
    download = store.add(7, "memchat-alice.zip", write("alice's data"), "10.0.0.1")
    path, name = store.find(download.token, "10.0.0.1", lambda user: True)
    assert path.read_text() == "alice's data" and name == "memchat-alice.zip"
    assert mode(path) == 0o600 and mode(store.folder) == 0o700
    assert path.is_relative_to(tmp_path)  # the data folder, not the shared system temp folder
    assert store.find(download.token, "10.0.0.2", lambda user: True) is None  # another address
    assert store.find("not-a-token", "10.0.0.1", lambda user: True) is None
    assert len(download.token) >= 40 and download.url.endswith(download.token)


def test_expired_replaced_and_deleted_owners_files_are_gone(tmp_path):
    store = DownloadStore(tmp_path / "downloads", ttl_s=60)
    first = store.add(1, "a.zip", write("1"), None)
    second = store.add(1, "a.zip", write("2"), None)  # a newer export replaces the older one
    assert store.find(first.token, None, lambda user: True) is None
    assert len(list(store.folder.iterdir())) == 1
    assert store.sweep(now=time.time() + 61) == 1 and store.find(second.token, None, lambda user: True) is None
    third = store.add(2, "b.zip", write("3"), None)
    assert store.find(third.token, None, lambda user: False) is None  # the owner was deleted
    assert list(store.folder.iterdir()) == []
    store.add(3, "c.zip", write("4"), None)
    store.remove_user(3)
    assert list(store.folder.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_a_new_process_starts_empty(tmp_path):
    store = DownloadStore(tmp_path / "downloads")

    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    try:
        store.add(1, "a.zip", broken, None)
    except OSError:
        pass
    assert list(store.folder.iterdir()) == []
    store.add(1, "a.zip", write("x"), None)
    assert DownloadStore(tmp_path / "downloads").folder.exists()
    assert list((tmp_path / "downloads").iterdir()) == []  # links of a stopped process are dead: files go


def test_odd_file_names_cannot_break_the_download_header(tmp_path):
    store = DownloadStore(tmp_path / "downloads")
    download = store.add(1, 'memchat-ä"\r\nX: y.zip', write("x"), None)
    assert download.filename == "memchat-_X_y.zip"


def test_a_link_revoked_while_its_file_is_written_is_never_handed_out(tmp_path):
    store = DownloadStore(tmp_path / "downloads")

    def logged_out_meanwhile(path):
        path.write_text("alice's data")
        store.remove_user(1)  # the owner logs out (or is deleted) while the zip is built

    with pytest.raises(LinkRevoked):
        store.add(1, "a.zip", logged_out_meanwhile, None)
    assert list(store.folder.iterdir()) == []
    store.add(1, "a.zip", write("fine now"), None)  # the next export works


def test_deleting_a_user_deletes_what_an_admin_exported_of_them(tmp_path):
    store = DownloadStore(tmp_path / "downloads")
    admin_copy = store.add(99, "adapter-alice.zip", write("alice's adapter"), None, subject_id=1)
    store.remove_user(1)
    assert store.find(admin_copy.token, None, lambda user: True) is None
    assert list(store.folder.iterdir()) == []
