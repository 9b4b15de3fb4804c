"""What the calls that do one step of the app in one transaction return: frozen bundles of rows.

The rows inside are detached copies, like every row storage returns (see storage.repository).
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import AdapterSnapshot, ApiKey, CompressionJob, LoginSession, Message, User


@dataclass(frozen=True)
class TurnStart:
    """A user's new message, stored, and what answering it needs (Storage.begin_turn)."""

    message: Message
    """The new message, as stored; its conversation is the one the reply goes into."""
    snapshot: AdapterSnapshot | None
    """The user's latest adapter snapshot, if any."""
    needs_rebuild: bool
    """The snapshot may hold deleted messages: answer without it until it is rebuilt."""
    pending: tuple[Message, ...]
    """Messages older than the new one that no usable adapter holds, oldest first: those after
    the snapshot's cursor, or all of them while a rebuild is awaited."""
    history: tuple[Message, ...] | None = None
    """All the user's messages, the new one last, when asked for (a page that shows them)."""


@dataclass(frozen=True)
class TurnEnd:
    """The reply of a turn, stored (Storage.finish_turn)."""

    message: Message
    job: CompressionJob | None
    """The compression job queued (or already active) because enough turns were waiting, else None."""


@dataclass(frozen=True)
class MessageCounts:
    """A user's messages and their tokens, absorbed into the adapter or pending, counted by the database."""

    messages: int
    absorbed_messages: int
    absorbed_tokens: int
    pending_messages: int
    pending_tokens: int


@dataclass(frozen=True)
class MemorySummary:
    """What a user's memory holds and awaits (Storage.memory_summary)."""

    user: User
    counts: MessageCounts
    snapshot: AdapterSnapshot | None
    """The latest adapter snapshot, if any."""
    job: CompressionJob | None
    """The queued or running compression job, if any."""


@dataclass(frozen=True)
class UserSummary:
    """One row of the list of users (Storage.user_summaries)."""

    user: User
    messages: int
    adapter_version: int | None
    """The latest snapshot's version; None when there is none."""


@dataclass(frozen=True)
class NewApiKey:
    """An API key just made (Storage.create_api_key): the only time the key itself is known."""

    key: ApiKey
    secret: str
    """The key to hand to its owner; storage keeps only its hash."""


@dataclass(frozen=True)
class KeyHolder:
    """Whose an API key is (Storage.find_api_key): the key's row and its user, read together."""

    key: ApiKey
    user: User


@dataclass(frozen=True)
class NewLogin:
    """A browser's login just begun (Storage.start_login): its row and its secret, which is kept
    nowhere else (only its SHA-256 is stored)."""

    login: LoginSession
    secret: str
