"""Browser logins and ids that are never reused (attacker findings, point 1), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table, insert, update

from storage import Storage, StorageSettings, make_engine, upgrade
from storage.models import LoginSession, utcnow
from tests.storage.helpers import FAST, PASSWORD


def test_a_deleted_accounts_ids_are_never_handed_out_again(storage: Storage, alice, bob):
    """SQLite reused the largest rowid after a delete: the next account got the deleted one's id."""
    key = storage.create_api_key(bob.id)
    job = storage.queue_job(bob.id)
    storage.delete_user(bob.id)
    carol = storage.create_user("carol", PASSWORD)
    assert carol.id > bob.id
    assert storage.create_api_key(carol.id).key.id > key.key.id
    assert storage.queue_job(carol.id).id > job.id


def test_a_login_names_its_user_until_it_ends(storage: Storage, alice, bob):
    first, second = storage.start_login(alice.id), storage.start_login(alice.id)
    assert first.secret != second.secret and first.secret.startswith("ms-")
    assert storage.login_user(first.secret).id == alice.id
    storage.end_login(first.secret)  # logout: this browser only
    assert storage.login_user(first.secret) is None
    assert storage.login_user(second.secret).id == alice.id
    bobs = storage.start_login(bob.id)
    assert storage.end_logins(alice.id) == 1  # logout everywhere: every login of alice, nobody else's
    assert storage.login_user(second.secret) is None
    assert storage.login_user(bobs.secret).id == bob.id


def test_a_deleted_accounts_login_never_becomes_the_next_account(storage: Storage, alice):
    """The finding itself: a page kept an id, and the next sign-up took that id."""
    login = storage.start_login(alice.id)
    storage.delete_user(alice.id)
    storage.create_user("mallory", PASSWORD)
    assert storage.login_user(login.secret) is None


@pytest.mark.parametrize("secret", [None, "", "ms-short", 42, "sk-mc-" + "a" * 43, "ms-" + "a" * 43])
def test_anything_but_a_live_secret_is_nobody(storage: Storage, alice, secret):
    storage.start_login(alice.id)
    assert storage.login_user(secret) is None


def test_only_the_secrets_hash_is_stored(storage: Storage, alice):
    login = storage.start_login(alice.id)
    with storage.engine.connect() as connection:
        dump = repr(connection.exec_driver_sql("SELECT * FROM login_sessions").fetchall())
    assert login.secret not in dump and login.secret[3:] not in dump


@pytest.mark.parametrize("column, age", [("last_seen_at", FAST.login_idle_s + 60),
                                         ("created_at", FAST.login_lifetime_s + 60)])
def test_an_idle_or_old_login_expires(storage: Storage, alice, column, age):
    login = storage.start_login(alice.id)
    with storage.engine.begin() as connection:
        connection.execute(update(LoginSession).values({column: utcnow() - timedelta(seconds=age)}))
    assert storage.login_user(login.secret) is None
    with storage.engine.connect() as connection:  # and it is gone, not only refused
        assert connection.exec_driver_sql("SELECT count(*) FROM login_sessions").scalar() == 0


def test_settings_refuse_an_idle_time_beyond_the_lifetime():
    with pytest.raises(ValueError, match="login_idle_s"):
        StorageSettings(login_idle_s=100, login_lifetime_s=10)


def test_migration_0005_names_the_audit_rows_of_existing_users(db_url: str, data_dir: Path):
    upgrade(db_url, "0004")
    engine = make_engine(db_url)
    meta = MetaData()
    users, audit = Table("users", meta, autoload_with=engine), Table("audit_log", meta, autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(insert(users), [
            dict(username=name, username_skeleton=name, password_hash="x", is_admin=False, needs_rebuild=False,
                 history_revision=0, created_at=utcnow()) for name in ("root", "alice")])
        connection.execute(insert(audit), [dict(actor_id=1, action="delete_user", target_user_id=None, details={},
                                                created_at=utcnow()),
                                           dict(actor_id=1, action="reset_adapter", target_user_id=2, details={},
                                                created_at=utcnow())])
    engine.dispose()
    upgrade(db_url)
    with Storage(db_url, data_dir, FAST) as store:
        assert [(e.actor_name, e.target_name) for e in store.list_audit()] == [("root", "alice"), ("root", None)]


def test_migration_0004_keeps_rows_and_stops_reusing_ids(db_url: str, data_dir: Path):
    upgrade(db_url, "0003")
    engine = make_engine(db_url)
    users = Table("users", MetaData(), autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(insert(users), [
            dict(username=name, username_skeleton=name, password_hash=FAST.password_hasher().hash(PASSWORD),
                 is_admin=False, needs_rebuild=False, history_revision=0, created_at=utcnow())
            for name in ("alice", "bob")])
    engine.dispose()
    upgrade(db_url)
    with Storage(db_url, data_dir, FAST) as store:
        alice, bob = store.list_users()
        assert store.authenticate("bob", PASSWORD).id == bob.id
        store.delete_user(bob.id)
        assert store.create_user("carol", PASSWORD).id > bob.id
