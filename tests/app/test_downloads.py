"""Download links: private, for their owner's address only, short-lived, revoked with their data,
and kept in the database so that any web replica serves a link another one made."""

import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from app.downloads import DownloadStore, LinkRevoked
from storage.models import DownloadLink
from tests.storage.helpers import PASSWORD, files_under, table_counts


def write(text: str):
    return lambda path: path.write_text(text)


@pytest.fixture
def users(storage):
    return [storage.create_user(name, PASSWORD).id for name in ("alice", "bob", "carol")]


def found(store, download, address=None, exists=lambda user: True):
    return store.find(download.token, address, exists)


def test_links_are_found_only_by_their_owner_s_address_on_any_replica(storage, users, tmp_path):
    alice = users[0]
    store, other_replica = DownloadStore(storage, tmp_path / "a"), DownloadStore(storage, tmp_path / "b")
    download = store.add(alice, "memchat-alice.zip", write("alice's data"), "10.0.0.1")
    assert found(other_replica, download, "10.0.0.1") == (b"alice's data", "memchat-alice.zip")
    assert found(store, download, "10.0.0.2") is None  # another address
    assert store.find("not-a-token", "10.0.0.1", lambda user: True) is None
    assert store.find("tökén", "10.0.0.1", lambda user: True) is None
    assert len(download.token) >= 40 and download.url.endswith(download.token)
    assert files_under(tmp_path / "a") == []  # built in a private folder, then kept in the database only


def test_expired_replaced_and_deleted_owners_links_are_gone(storage, users, tmp_path):
    alice, bob, carol = users
    store = DownloadStore(storage, tmp_path / "downloads", ttl_s=60)
    first = store.add(alice, "a.zip", write("1"), None)
    second = store.add(alice, "a.zip", write("2"), None)  # a newer export replaces the older one
    assert found(store, first) is None and found(store, second) == (b"2", "a.zip")
    with storage.engine.begin() as connection:  # ten minutes later
        connection.execute(update(DownloadLink).values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    assert found(store, second) is None and store.sweep() == 1
    third = store.add(bob, "b.zip", write("3"), None)
    assert found(store, third, exists=lambda user: False) is None  # the owner was deleted
    assert found(store, third) is None  # ...and their links with them
    fourth = store.add(carol, "c.zip", write("4"), None)
    store.remove_user(carol)
    assert found(store, fourth) is None


def test_a_failed_build_leaves_nothing(storage, users, tmp_path):
    store = DownloadStore(storage, tmp_path / "downloads")

    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.add(users[0], "a.zip", broken, None)
    assert list(store.folder.iterdir()) == []
    assert found(store, store.add(users[0], "a.zip", write("x"), None)) == (b"x", "a.zip")


def test_odd_file_names_cannot_break_the_download_header(storage, users, tmp_path):
    store = DownloadStore(storage, tmp_path / "downloads")
    download = store.add(users[0], 'memchat-ä"\r\nX: y.zip', write("x"), None)
    assert download.filename == "memchat-_X_y.zip"


def test_a_link_revoked_while_its_file_is_built_is_never_handed_out(storage, users, tmp_path):
    """The owner logs out (or is deleted) on another replica while the zip is built here."""
    alice = users[0]
    store, other_replica = DownloadStore(storage, tmp_path / "a"), DownloadStore(storage, tmp_path / "b")

    def logged_out_meanwhile(path):
        path.write_text("alice's data")
        other_replica.remove_user(alice)

    with pytest.raises(LinkRevoked):
        store.add(alice, "a.zip", logged_out_meanwhile, None)
    assert table_counts(storage)["download_links"] == 0 and list(store.folder.iterdir()) == []
    assert found(store, store.add(alice, "a.zip", write("fine now"), None)) == (b"fine now", "a.zip")


def test_deleting_a_user_deletes_what_an_admin_exported_of_them(storage, users, tmp_path):
    alice, admin = users[0], users[2]
    store = DownloadStore(storage, tmp_path / "downloads")
    admin_copy = store.add(admin, "adapter-alice.zip", write("alice's adapter"), None, subject_id=alice)
    storage.delete_user(alice)
    assert found(store, admin_copy) is None  # the database took it with her
    kept = store.add(admin, "adapter-bob.zip", write("bob's adapter"), None, subject_id=users[1])
    store.remove_user(users[1])
    assert found(store, kept) is None
    assert time.time() < kept.expires_at
