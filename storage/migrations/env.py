"""Alembic environment: runs storage's migrations on the connection that storage.db.upgrade opened.

Batch mode ("move and copy") lets the same migration scripts alter tables on SQLite, whose ALTER
TABLE cannot change or drop most things.
"""

from typing import Any

from alembic import context

from storage.models import Base, UTCDateTime

# Any fixed number: concurrent app starts on one PostgreSQL database migrate one after the other.
PG_MIGRATION_LOCK = 0x6D656D63


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | bool:
    """Autogenerate writes UTCDateTime as the column type it stores: migrations never import models."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with storage.db.upgrade(url), which hands Alembic a connection")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True, render_item=render_item)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
    context.run_migrations()
