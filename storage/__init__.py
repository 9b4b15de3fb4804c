"""What is remembered: users, their conversations, and the adapter snapshots that hold their memory.

Knows nothing of tensors: an adapter state is bytes with a size and a sha256. Imports neither
adapter_core nor app. SQLite by default (data/memchat.db), any SQLAlchemy URL otherwise
(PostgreSQL with psycopg 3 is tested); the schema is kept up to date by Alembic migrations.
"""

from .db import default_url, make_engine, upgrade
from .errors import (
    CursorError, LeaseLost, NotFound, RebuildRequired, SnapshotFileError, StorageError, UsernameLookAlike, UsernameTaken,
    ValidationError,
)
from .models import JobClaim
from .repository import Storage
from .results import KeyHolder, MemorySummary, MessageCounts, NewApiKey, NewLogin, TurnEnd, TurnStart, UserSummary
from .settings import StorageSettings

__all__ = [
    "CursorError", "JobClaim", "KeyHolder", "LeaseLost", "MemorySummary", "MessageCounts", "NewApiKey", "NewLogin", "NotFound", "RebuildRequired",
    "SnapshotFileError", "Storage", "StorageError", "StorageSettings", "TurnEnd", "TurnStart", "UserSummary",
    "UsernameLookAlike", "UsernameTaken", "ValidationError", "default_url", "make_engine", "upgrade",
]
