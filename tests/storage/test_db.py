import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table, insert, inspect

from storage import Storage, UsernameTaken, default_url, make_engine, upgrade
from storage.db import alembic_config, current_revision
from storage.models import Base
from tests.storage.helpers import FAST, PASSWORD

HEAD = "0009"


def _schema_differences(url: str, metadata: MetaData) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def test_default_url_is_sqlite_in_the_data_folder(tmp_path):
    url = default_url(tmp_path / "data")
    assert url == f"sqlite:///{tmp_path / 'data' / 'memchat.db'}"
    with Storage(data_dir=tmp_path / "data", settings=FAST) as store:
        store.migrate()
        store.create_user("alice", PASSWORD)
    assert (tmp_path / "data" / "memchat.db").stat().st_size > 0


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}", FAST)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == FAST.busy_timeout_ms
    engine.dispose()


def test_upgrade_creates_every_table_at_head(db_url):
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == HEAD
    engine = make_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert set(Base.metadata.tables) | {"alembic_version"} == tables


def test_migrated_schema_matches_the_models(db_url):
    upgrade(db_url)
    assert _schema_differences(db_url, Base.metadata) == []


def test_the_comparison_would_see_a_difference(db_url):
    """Guards the test above: a model the migrations lack must show up as a difference."""
    upgrade(db_url)
    metadata = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(metadata)
    Table("not_migrated", metadata, Column("id", Integer, primary_key=True))
    differences = _schema_differences(db_url, metadata)
    assert [d[0] for d in differences] == ["add_table"]
    assert differences[0][1].name == "not_migrated"


def test_upgrade_is_idempotent_and_keeps_data(db_url, data_dir: Path):
    upgrade(db_url)
    with Storage(db_url, data_dir, FAST) as store:
        user = store.create_user("alice", PASSWORD)
    upgrade(db_url)
    upgrade(db_url)
    assert current_revision(db_url) == HEAD
    assert _schema_differences(db_url, Base.metadata) == []
    with Storage(db_url, data_dir, FAST) as store:
        assert [u.id for u in store.list_users()] == [user.id]


def test_downgrade_to_nothing_and_up_again(db_url):
    upgrade(db_url)
    engine = make_engine(db_url, foreign_keys=False)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert _schema_differences(db_url, Base.metadata) == []


def test_upgrade_to_0002_backfills_username_skeletons(db_url, data_dir: Path):
    """Existing names get their skeleton; one that already looked like an older account's keeps
    NULL (the unique index allows it) and can still log in."""
    upgrade(db_url, "0001")
    users = Table("users", MetaData(), autoload_with=(engine := make_engine(db_url)))
    hasher = FAST.password_hasher()
    names = ["paypal", "p\u0430ypal", "bob", "rnodern", "modern"]  # the 2nd and 5th look like the 1st and 4th
    with engine.begin() as connection:
        connection.execute(insert(users), [
            dict(username=name, password_hash=hasher.hash(PASSWORD), is_admin=False, needs_rebuild=False,
                 history_revision=0, created_at=datetime.now(timezone.utc)) for name in names])
    engine.dispose()
    upgrade(db_url)
    assert current_revision(db_url) == HEAD
    with Storage(db_url, data_dir, FAST) as store:
        assert [(u.username, u.username_skeleton) for u in store.list_users()] == [
            ("paypal", "paypal"), ("p\u0430ypal", None), ("bob", "bob"), ("rnodern", "rnodern"), ("modern", None)]
        assert store.authenticate("p\u0430ypal", PASSWORD).username == "p\u0430ypal"
        with pytest.raises(UsernameTaken, match="looks too much like"):
            store.create_user("PAYPA1", PASSWORD)
        assert store.create_user("alice", PASSWORD).username_skeleton == "alice"


def test_processes_starting_at_once_migrate_once(db_url):
    """Web replicas and workers of one database start together (scripts/cluster.sh, a deployment)."""
    if db_url.startswith("sqlite"):
        pytest.skip("one process serves a SQLite database (--role all)")

    failures = []

    def start() -> None:
        try:
            upgrade(db_url)
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            failures.append(e)

    starting = [threading.Thread(target=start) for _ in range(4)]
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join()
    assert failures == [] and current_revision(db_url) == HEAD
