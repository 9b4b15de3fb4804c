"""The tables of storage, as SQLAlchemy 2 typed models.

Every row that belongs to a user points at `users.id` with ON DELETE CASCADE, so deleting a user
deletes all of it in the database itself (storage.files removes the user's folder). Messages
carry their user as well as their conversation, and a composite foreign key keeps the two in
agreement, so that a query by user id can never reach another user's messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, CheckConstraint, DateTime, ForeignKey, ForeignKeyConstraint, Index, LargeBinary, MetaData, String,
    Text, UniqueConstraint, text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .settings import USERNAME_COLUMN_CHARS

USERNAME_SKELETON_CHARS = 8 * USERNAME_COLUMN_CHARS
"""Width of the skeleton column: a character spells out to at most 7 in its skeleton (a Hangul
syllable), so eight per character of the widest username leaves room."""

API_KEY_NAME_CHARS = 64
"""Longest name of an API key."""

JOB_STATUSES = ("queued", "running", "done", "failed")
ACTIVE_JOB = "status IN ('queued', 'running')"

# Named constraints: Alembic needs names to alter or drop a constraint (SQLite batch mode above all).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone, so it is re-attached)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: storage keeps only timezone-aware UTC times")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


NEVER_REUSED = {"sqlite_autoincrement": True}
"""Table option of every table: an id, once used, never comes back. Plain SQLite hands the largest
rowid out again once its row is deleted, so a page, key, link, job or cursor that still names a
deleted row would name the next one made (a deleted account's open page would become the next
account); AUTOINCREMENT never does. PostgreSQL's sequences never reuse a value anyway."""


class User(Base):
    __tablename__ = "users"
    __table_args__ = (NEVER_REUSED,)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(USERNAME_COLUMN_CHARS), unique=True)
    """NFKC-normalised and case-folded (see storage.validation.username)."""
    username_skeleton: Mapped[str | None] = mapped_column(String(USERNAME_SKELETON_CHARS), unique=True, index=True)
    """What the name looks like (storage.validation.username_skeleton); unique, so that no new name
    looks like an existing one. NULL only for an account made before migration 0002 whose name
    already looked like an older account's."""
    password_hash: Mapped[str] = mapped_column(String(255))
    """Argon2id, in the PHC string format (parameters and salt included)."""
    is_admin: Mapped[bool] = mapped_column(default=False)
    needs_rebuild: Mapped[bool] = mapped_column(default=False)
    """True after a message was deleted: the adapter still holds it and must be rebuilt from scratch."""
    history_revision: Mapped[int] = mapped_column(default=0)
    """Bumped by each message deletion, so a rebuild can tell whether it read the latest history."""
    downloads_revision: Mapped[int] = mapped_column(default=0, server_default="0")
    """Bumped each time the user's download links are revoked (logout, deletion, a forgotten message),
    so that an export being built meanwhile, on any replica, is refused rather than handed out."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"
    # (id, user_id) is unique so that messages can refer to it with a composite foreign key.
    __table_args__ = (UniqueConstraint("id", "user_id"), NEVER_REUSED)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterSnapshot(Base):
    __tablename__ = "adapter_snapshots"
    __table_args__ = (UniqueConstraint("user_id", "version"), NEVER_REUSED)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    version: Mapped[int]
    """1, 2, 3... per user; the latest snapshot is the one with the highest version."""
    generator_id: Mapped[str] = mapped_column(String(200))
    base_model_id: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(300))
    """File path relative to the data folder (so that the folder can move), or DATABASE_PATH_PREFIX
    and a name for bytes kept in the database (SnapshotBlob)."""
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    cursor: Mapped[int]
    """Id of the last message absorbed, 0 when none was."""
    tokens_absorbed: Mapped[int] = mapped_column(BigInteger)
    stats: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SnapshotBlob(Base):
    """A snapshot's bytes kept in the database rather than in a file (StorageSettings.snapshot_store
    "database"), so that replicas on other machines read them without a shared folder; a row's
    AdapterSnapshot.path then starts with DATABASE_PATH_PREFIX. Content-addressed per user, as files."""

    __tablename__ = "snapshot_blobs"
    __table_args__ = (UniqueConstraint("user_id", "sha256"), NEVER_REUSED)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)


DATABASE_PATH_PREFIX = "database/"
"""AdapterSnapshot.path of a snapshot whose bytes are a SnapshotBlob: 'database/user-<id>/<sha256>'."""


class TurnLease(Base):
    """Who answers a user's turn now, when web replicas share the database (one turn of a user at a
    time, across replicas): held until `lease_until`, renewed while the reply runs, so that a
    replica that died locks its user out for one lease at most."""

    __tablename__ = "turn_leases"
    __table_args__ = (NEVER_REUSED,)

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    """The replica process answering it (a random id per process)."""
    lease_until: Mapped[datetime]


class DownloadLink(Base):
    """A file handed to its owner for a short time (app/downloads.py): a data or adapter export,
    kept in the database so that a link made on one web replica is served by any other."""

    __tablename__ = "download_links"
    __table_args__ = (NEVER_REUSED,)

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 of the link's token, in hex (the token itself is only in the link)."""
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    """Who may download it."""
    subject_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    """Whose data it holds (the owner's own, or a user an admin exported)."""
    address: Mapped[str | None] = mapped_column(String(64))
    """The client address that asked for it: the only one it is served to (None: any)."""
    filename: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime]
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        ForeignKeyConstraint(["conversation_id", "user_id"], ["conversations.id", "conversations.user_id"],
                             ondelete="CASCADE"),
        CheckConstraint("role IN ('user', 'assistant')", name="role"),
        Index("ix_messages_user_id_id", "user_id", "id"),
        # Cursors compare message ids, so an id must never come back after a deletion.
        NEVER_REUSED,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    conversation_id: Mapped[int]
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_snapshots.id", ondelete="SET NULL"), index=True)
    """The snapshot that absorbed this message; None while it waits to be absorbed."""


class CompressionJob(Base):
    __tablename__ = "compression_jobs"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name="status"),
        # At most one queued-or-running job per user, enforced by the database itself.
        Index("uq_compression_jobs_active_user", "user_id", unique=True,
              sqlite_where=text(ACTIVE_JOB), postgresql_where=text(ACTIVE_JOB)),
        Index("ix_compression_jobs_status_not_before", "status", "not_before"),
        NEVER_REUSED,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(default=0)
    """Runs started so far (a claim counts one, whether the run then succeeds, fails or crashes)."""
    error: Mapped[str | None] = mapped_column(Text)
    rerun: Mapped[bool] = mapped_column(default=False)
    """Asked for again while running: finishing queues a follow-up job for the newer messages."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    """Not claimed before this time (retry backoff)."""
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    """While running: the claiming worker holds the job until then (renewed as it runs); after it,
    claim_job hands the job to another worker, and the first one can no longer finish it."""

    @property
    def claim(self) -> JobClaim:
        """This run of the job (its attempt number tells runs apart): what the worker running it
        shows to renew its lease, commit its snapshot and finish it."""
        return JobClaim(self.id, self.attempts)


@dataclass(frozen=True)
class JobClaim:
    """One worker's run of a compression job."""

    job_id: int
    attempt: int


class ApiKey(Base):
    """A key that lets a program act as its user through the OpenAI-compatible API (app/openai_api.py).

    Only the key's SHA-256 is kept: the key itself is shown once, when it is made. A key is 256
    random bits, so a plain hash suffices (a slow password hash would only slow every request)."""

    __tablename__ = "api_keys"
    __table_args__ = (NEVER_REUSED,)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(API_KEY_NAME_CHARS))
    """What the user called it (which client uses it), if anything."""
    hint: Mapped[str] = mapped_column(String(32))
    """The key's first and last characters ('sk-mc-Ab…wxyz'), so that its owner can tell keys apart."""
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 of the key, in hex."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    """When a request last used it, to the minute (storage.repository.KEY_USE_RESOLUTION)."""


class AuditEntry(Base):
    """An admin action. Kept when the users involved are deleted, with their ids set to NULL and
    their names as they were when it was written."""

    __tablename__ = "audit_log"
    __table_args__ = (NEVER_REUSED,)

    id: Mapped[int] = mapped_column(primary_key=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    action: Mapped[str] = mapped_column(String(64))
    target_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    actor_name: Mapped[str | None] = mapped_column(String(USERNAME_COLUMN_CHARS))
    target_name: Mapped[str | None] = mapped_column(String(USERNAME_COLUMN_CHARS))
    details: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)



class LoginSession(Base):
    """A browser's login: the page holds its secret, and every action of the page is checked
    against this row (app/access.py). It ends (the row is deleted) at logout, at a logout from
    everywhere, when it has been idle or alive too long, and with its account (ON DELETE CASCADE):
    a page of a deleted account can never act again, whatever account is made after it.

    Only the secret's SHA-256 is kept: it is 256 random bits, as an API key's."""

    __tablename__ = "login_sessions"
    __table_args__ = (NEVER_REUSED,)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 of the session's secret, in hex."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    """When the page last acted, to the minute (storage.repository.SEEN_RESOLUTION)."""
