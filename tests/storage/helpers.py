"""Shared helpers of the storage tests (fixtures are in conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event, func, or_, select

from storage import Storage, StorageSettings
from storage.models import Base

FAST = StorageSettings(argon2_time_cost=1, argon2_memory_cost_kib=8, argon2_parallelism=1,
                       job_max_attempts=3, job_retry_base_s=10.0, job_retry_max_s=25.0)
"""Cheap password hashing, so that the suite spends its time on storage rather than on Argon2."""

PASSWORD = "correct horse battery"


def table_counts(storage: Storage) -> dict[str, int]:
    """Rows in every table, to show that a refused call changed nothing."""
    with storage.engine.connect() as connection:
        return {table.name: connection.scalar(select(func.count()).select_from(table))
                for table in Base.metadata.sorted_tables}


def user_row_counts(storage: Storage, user_id: int) -> dict[str, int]:
    """Rows tied to the user in every table: the user row itself and rows referring to users.id.

    Found from the foreign keys in the models, so that a table added later is counted too.
    """
    counts = {}
    with storage.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            columns = [column for column in table.columns
                       if any(fk.column is Base.metadata.tables["users"].c.id for fk in column.foreign_keys)]
            if table.name == "users":
                columns = [table.c.id]
            assert columns, f"table {table.name} has no column tying it to a user"
            query = select(func.count()).select_from(table).where(or_(*(c == user_id for c in columns)))
            counts[table.name] = connection.scalar(query)
    return counts


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@contextmanager
def transactions(storage: Storage) -> Iterator[list[str]]:
    """Counts the database transactions begun meanwhile, from any thread: the list grows by one
    entry (the thread's name) per BEGIN on the storage's engine (its writing variant included)."""
    begun: list[str] = []

    def on_begin(connection) -> None:
        begun.append(threading.current_thread().name)

    event.listen(storage.engine, "begin", on_begin)
    try:
        yield begun
    finally:
        event.remove(storage.engine, "begin", on_begin)
