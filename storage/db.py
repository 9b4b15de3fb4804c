"""Engines and schema migrations.

SQLite (the default, one file under the data folder) and PostgreSQL run the same code. For SQLite
every connection gets WAL (readers do not block the writer), foreign keys (off by default in
SQLite, and the ON DELETE CASCADE of user deletion needs them) and a busy timeout. SQLAlchemy takes
over BEGIN from the sqlite3 driver, as its SQLite dialect documentation advises, so that reads are
transactional too and writers can take the write lock up front (see `writer`). The SQLite file is
made 0600 before the driver first opens it (SQLite gives its -wal and -shm files the same mode).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url

from .files import FILE_MODE, make_private_dirs, restrict_mode
from .settings import StorageSettings

DB_FILENAME = "memchat.db"
MIGRATIONS = Path(__file__).resolve().with_name("migrations")


def default_url(data_dir: str | Path) -> str:
    """SQLite in the app's data folder."""
    return URL.create("sqlite", database=str(Path(data_dir).resolve() / DB_FILENAME)).render_as_string()


def make_engine(url: str | URL, settings: StorageSettings | None = None, *, foreign_keys: bool = True) -> Engine:
    """An engine for any SQLAlchemy URL; SQLite ones are set up for safe concurrent use."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:" and not url.query.get("uri"):
        _private_database_file(Path(url.database))
    engine = create_engine(url)
    busy_timeout_ms = (settings or StorageSettings()).busy_timeout_ms

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own; _on_begin does
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _private_database_file(path: Path) -> None:
    """Create the SQLite file (and its missing folders, 0700) with mode 0600 before SQLite opens
    it, which would make it readable by everyone; an existing one, and its -wal and -shm files,
    lose any looser bits. An existing folder is left alone: the database may live in one shared."""
    make_private_dirs(path.parent)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, FILE_MODE))  # an empty file is an empty database
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        if file.exists():
            restrict_mode(file, FILE_MODE)


def writer(engine: Engine) -> Engine:
    """The same engine, for transactions that write.

    On SQLite they start with BEGIN IMMEDIATE: a transaction that reads and then writes would
    otherwise fail at once ("database is locked") whenever another writer got in between.
    PostgreSQL ignores the option; there the repository locks rows instead.
    """
    return engine.execution_options(sqlite_begin="IMMEDIATE")


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration, built in code: no alembic.ini is needed at run time."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


MIGRATION_LOCK = 0x6D656D63
"""PostgreSQL advisory lock held while one process migrates (several start at once in a cluster)."""


def upgrade(url: str | URL, revision: str = "head", settings: StorageSettings | None = None) -> None:
    """Bring the schema to `revision`; the app calls this on start. Running it again changes nothing.

    SQLite runs with foreign keys off, because batch migrations copy and drop tables, and dropping
    a parent table with foreign keys on would cascade-delete its children. The keys are checked
    once the migrations are done instead.
    """
    engine = make_engine(url, settings, foreign_keys=False)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":  # replicas and workers start at once: one migrates,
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")  # the rest wait
            command.upgrade(alembic_config(connection), revision)
            if connection.dialect.name == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left rows with broken foreign keys: {broken[:5]}")
    finally:
        engine.dispose()


def current_revision(url: str | URL) -> str | None:
    """The schema revision the database is at (None before the first upgrade)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
