"""Storage: everything the app asks of the database and of the snapshot files, in one class.

Rules every method keeps:
- Input is validated before anything is written, so a refused call leaves no trace.
- A method that takes a user id reads and writes only that user's rows; another user's row is
  reported as NotFound, exactly like a row that does not exist.
- Each call is one transaction. Writes that depend on a user's current state first lock that
  user's row (SELECT ... FOR NO KEY UPDATE on PostgreSQL; on SQLite every write transaction
  starts with BEGIN IMMEDIATE, see storage.db.writer), so that one user's writes happen one at
  a time. This is what makes cursors safe: a user's messages get their ids in commit order, so
  whoever reads "messages after the cursor" never misses one that commits later with a smaller id.
- Returned rows are detached copies: changing them changes nothing in the database.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import URL, case, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from . import validation
from .db import default_url, make_engine, upgrade, writer
from .errors import (
    CursorError, LeaseLost, NotFound, RebuildRequired, SnapshotFileError, StorageError, UsernameLookAlike,
    UsernameTaken, ValidationError,
)
from .files import DIR_MODE, SnapshotFiles, StoredFile, make_private_dirs, restrict_mode
from .models import (
    API_KEY_NAME_CHARS, USERNAME_SKELETON_CHARS, AdapterSnapshot, ApiKey, AuditEntry, CompressionJob, Conversation,
    DATABASE_PATH_PREFIX, DownloadLink, JobClaim, LoginSession, Message, SnapshotBlob, TurnLease, User, utcnow,
)
from .results import KeyHolder, MemorySummary, MessageCounts, NewApiKey, NewLogin, TurnEnd, TurnStart, UserSummary
from .settings import StorageSettings

ID_MAX_CHARS = 200
"""Longest generator id or base model id (the width of their columns)."""
ACTION_MAX_CHARS = 64
ERROR_MAX_CHARS = 4000
BIGINT_MAX = 2**63 - 1
API_KEY_PREFIX = "sk-mc-"
"""How every API key starts: recognisable as one of ours (by people and by secret scanners)."""
_API_KEY = re.compile(r"sk-mc-[A-Za-z0-9_-]{43}")
"""The prefix and 32 random bytes in URL-safe base64 (secrets.token_urlsafe(32))."""
KEY_USE_RESOLUTION = timedelta(minutes=1)
"""How finely an API key's (or a login's) last use is recorded: at most one write per key and minute."""
TAKEN_OVER = "interrupted: the worker running it stopped renewing its lease"
"""The error a job taken over from a worker that died (or hung) shows."""

LOGIN_PREFIX = "ms-"
_LOGIN_SECRET = re.compile(r"ms-[A-Za-z0-9_-]{43}")
"""A login's secret: the prefix and 32 random bytes in URL-safe base64."""


class Storage:
    """Users, conversations, messages, adapter snapshots, compression jobs and the audit log."""

    def __init__(self, url: str | URL | None = None, data_dir: str | Path = "data",
                 settings: StorageSettings | None = None) -> None:
        self.settings = settings or StorageSettings()
        self.data_dir = Path(data_dir)
        make_private_dirs(self.data_dir)  # 0700: the database and every user's memory live here
        restrict_mode(self.data_dir, DIR_MODE)
        self.url = url or default_url(self.data_dir)
        self.engine = make_engine(self.url, self.settings)
        self.files = SnapshotFiles(self.data_dir)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(writer(self.engine), expire_on_commit=False)
        self._hasher = self.settings.password_hasher()
        # Verified against when a username is unknown, so that answering "no such user" takes
        # as long as answering "wrong password".
        self._dummy_hash = self._hasher.hash("no account has this password")

    def migrate(self) -> None:
        """Bring the schema up to date (storage.db.upgrade); the app calls this on start."""
        upgrade(self.url, settings=self.settings)

    def ping(self) -> None:
        """Raise if the database cannot be reached (a replica's health check)."""
        with self._reading() as session:
            session.execute(select(1))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- users -----------------------------------------------------------------------------

    def create_user(self, username: str, password: str, *, is_admin: bool = False) -> User:
        """A new account; UsernameTaken if the name is taken, UsernameLookAlike (a kind of
        UsernameTaken) if it looks like an existing one (storage.validation.username_skeleton)."""
        name = validation.username(username, self.settings)
        secret = validation.password(password, self.settings)
        if validation.normalize_username(secret) in (name, validation.normalize_username(str(username))):
            raise ValidationError("password", "must not be the username")
        skeleton = validation.username_skeleton(name)
        if len(skeleton) > USERNAME_SKELETON_CHARS:
            raise ValidationError("username", "is too long once spelled out for the look-alike check")
        user = User(username=name, username_skeleton=skeleton, password_hash=self._hasher.hash(secret),
                    is_admin=bool(is_admin))
        try:
            with self._writing() as session:
                session.add(user)
        except IntegrityError as e:  # the unique columns are the username and its skeleton
            raise self._name_refusal(name) from e
        return user

    def authenticate(self, username: str, password: str) -> User | None:
        """The user if the password is right, else None; rehashes it if the Argon2 costs changed."""
        try:
            name = validation.username(username, self.settings, new=False)
            secret = validation.password(password, self.settings, new=False)
        except ValidationError:
            return None  # no account can have an invalid name or password
        user = self.find_user(name)
        if user is None:
            self._verify(self._dummy_hash, secret)
            return None
        if not self._verify(user.password_hash, secret):
            return None
        if self._hasher.check_needs_rehash(user.password_hash):
            new_hash = self._hasher.hash(secret)
            with self._writing() as session:
                session.execute(update(User)
                                .where(User.id == user.id, User.password_hash == user.password_hash)
                                .values(password_hash=new_hash))
            user.password_hash = new_hash
        return user

    def get_user(self, user_id: int) -> User:
        with self._reading() as session:
            return self._user(session, user_id)

    def find_user(self, username: str) -> User | None:
        """By username, compared after the same normalisation as at sign-up."""
        try:
            name = validation.username(username, self.settings, new=False)
        except ValidationError:
            return None
        with self._reading() as session:
            return session.scalars(select(User).where(User.username == name)).one_or_none()

    def list_users(self, *, admins_only: bool = False) -> list[User]:
        query = select(User).order_by(User.id)
        with self._reading() as session:
            return list(session.scalars(query.where(User.is_admin) if admins_only else query))

    def user_summaries(self) -> list[UserSummary]:
        """Every user with their number of messages and latest adapter version, in one query."""
        messages = (select(Message.user_id, func.count(Message.id).label("n"))
                    .group_by(Message.user_id).subquery())
        versions = (select(AdapterSnapshot.user_id, func.max(AdapterSnapshot.version).label("version"))
                    .group_by(AdapterSnapshot.user_id).subquery())
        query = (select(User, func.coalesce(messages.c.n, 0), versions.c.version)
                 .outerjoin(messages, messages.c.user_id == User.id)
                 .outerjoin(versions, versions.c.user_id == User.id).order_by(User.id))
        with self._reading() as session:
            return [UserSummary(user, count, version) for user, count, version in session.execute(query)]

    def set_admin(self, user_id: int, is_admin: bool, *, actor_id: int | None = None) -> User:
        """Grant or revoke admin rights; with an actor, the change is audited in the same transaction."""
        with self._writing() as session:
            user = self._lock_user(session, user_id)
            user.is_admin = bool(is_admin)
            if actor_id is not None:
                self._audit(session, actor_id, "set_admin", user_id, {"is_admin": bool(is_admin)})
        return user

    def delete_user(self, user_id: int, *, actor_id: int | None = None) -> None:
        """Delete every row of the user (the foreign keys cascade), then the user's file folder.

        Should removing the folder fail, remove_orphan_files finishes the job later.
        """
        with self._writing() as session:
            self._lock_user(session, user_id)
            if actor_id is not None:  # before the deletion, which may take the actor too
                self._audit(session, actor_id, "delete_user", user_id, {"user_id": user_id})
            session.execute(delete(User).where(User.id == user_id))
        self.files.remove_user(user_id)

    # --- API keys --------------------------------------------------------------------------

    def create_api_key(self, user_id: int, name: str | None = None) -> NewApiKey:
        """A new key for the user, audited in the same transaction; at most
        settings.api_keys_per_user at once. The key itself is in the result and nowhere else."""
        checked_name = validation.key_name(name, API_KEY_NAME_CHARS)
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(user_id=user_id, name=checked_name, hint=f"{secret[:8]}…{secret[-4:]}",
                     key_hash=_key_hash(secret))
        with self._writing() as session:
            self._lock_user(session, user_id)  # the count below cannot change until the commit
            held = session.scalar(select(func.count(ApiKey.id)).where(ApiKey.user_id == user_id))
            if held >= self.settings.api_keys_per_user:
                raise ValidationError("key", f"cannot be made: {held} keys is the most one account may hold; "
                                             "revoke one first")
            session.add(key)
            session.flush()
            self._audit(session, user_id, "create_api_key", user_id, {"key_id": key.id, "hint": key.hint})
        return NewApiKey(key, secret)

    def list_api_keys(self, user_id: int) -> list[ApiKey]:
        """The user's keys, oldest first (their hashes and hints; the keys themselves are not kept)."""
        with self._reading() as session:
            return list(session.scalars(select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.id)))

    def delete_api_key(self, user_id: int, key_id: int, *, actor_id: int | None = None) -> ApiKey:
        """Revoke one of the user's keys: it stops working with this commit. Another user's key is
        NotFound, like one that does not exist. With an actor (the owner, or an admin), audited in
        the same transaction."""
        checked = validation.count("key_id", key_id)
        with self._writing() as session:
            self._lock_user(session, user_id)
            key = session.scalars(select(ApiKey).where(ApiKey.id == checked, ApiKey.user_id == user_id)).one_or_none()
            if key is None:
                raise NotFound(f"user {user_id} has no API key {checked}")
            session.delete(key)
            if actor_id is not None:
                self._audit(session, actor_id, "revoke_api_key", user_id, {"key_id": key.id, "hint": key.hint})
        return key

    def find_api_key(self, secret: object) -> KeyHolder | None:
        """The key and its user, read together; None for anything that is not a live key (a
        malformed one is not looked up at all). The key's use is recorded in a second, writing
        transaction only when the last one recorded is older than KEY_USE_RESOLUTION, so that
        most requests read and never wait for the database's write lock."""
        if not is_api_key(secret):
            return None
        query = select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash == _key_hash(secret))
        with self._reading() as session:
            row = session.execute(query).one_or_none()
        if row is None:
            return None
        key, user = row
        now = utcnow()
        if key.last_used_at is None or now - key.last_used_at >= KEY_USE_RESOLUTION:
            with self._writing() as session:  # conditional: of two requests racing here, one writes
                session.execute(update(ApiKey).where(
                    ApiKey.id == key.id,
                    ApiKey.last_used_at.is_(None) | (ApiKey.last_used_at <= now - KEY_USE_RESOLUTION),
                ).values(last_used_at=now))
            key.last_used_at = now
        return KeyHolder(key, user)

    # --- browser logins ---------------------------------------------------------------------

    def start_login(self, user_id: int) -> NewLogin:
        """A new login of the user (a browser that gave the right password); its secret is in the
        result and nowhere else. Logins that have expired meanwhile are deleted on the way."""
        secret = LOGIN_PREFIX + secrets.token_urlsafe(32)
        login = LoginSession(user_id=user_id, secret_hash=_key_hash(secret))
        with self._writing() as session:
            self._lock_user(session, user_id)
            session.execute(delete(LoginSession).where(self._expired(utcnow())))
            session.add(login)
        return NewLogin(login, secret)

    def login_user(self, secret: object) -> User | None:
        """The user whose login this secret is; None when it is none: malformed (not looked up), ended
        (logout, logout everywhere, account deleted) or expired (settings.login_idle_s and
        login_lifetime_s; deleted then). Its use is recorded, at most once a minute, as an API key's."""
        if not isinstance(secret, str) or not _LOGIN_SECRET.fullmatch(secret):
            return None
        now = utcnow()
        query = (select(LoginSession, User, self._expired(now)).join(User, User.id == LoginSession.user_id)
                 .where(LoginSession.secret_hash == _key_hash(secret)))
        with self._reading() as session:
            row = session.execute(query).one_or_none()
        if row is None:
            return None
        login, user, expired = row
        if expired:
            self.end_login(secret)
            return None
        if now - login.last_seen_at >= KEY_USE_RESOLUTION:
            with self._writing() as session:
                session.execute(update(LoginSession).where(LoginSession.id == login.id).values(last_seen_at=now))
        return user

    def end_login(self, secret: object) -> None:
        """End one login (logout); nothing happens for a secret that is no login."""
        if isinstance(secret, str) and _LOGIN_SECRET.fullmatch(secret):
            with self._writing() as session:
                session.execute(delete(LoginSession).where(LoginSession.secret_hash == _key_hash(secret)))

    def end_logins(self, user_id: int) -> int:
        """End every login of the user (logout everywhere); how many there were."""
        with self._writing() as session:
            return session.execute(delete(LoginSession).where(LoginSession.user_id == user_id)).rowcount

    def _expired(self, now: datetime):
        """The logins past their idle time or lifetime, as a WHERE clause."""
        return ((LoginSession.last_seen_at < now - timedelta(seconds=self.settings.login_idle_s))
                | (LoginSession.created_at < now - timedelta(seconds=self.settings.login_lifetime_s)))

    # --- conversations and messages --------------------------------------------------------

    def start_conversation(self, user_id: int, title: str | None = None) -> Conversation:
        checked_title = validation.title(title, self.settings)
        with self._writing() as session:
            self._lock_user(session, user_id)
            conversation = Conversation(user_id=user_id, title=checked_title)
            session.add(conversation)
        return conversation

    def get_conversation(self, user_id: int, conversation_id: int) -> Conversation:
        with self._reading() as session:
            return self._conversation(session, user_id, conversation_id)

    def list_conversations(self, user_id: int) -> list[Conversation]:
        with self._reading() as session:
            return list(session.scalars(
                select(Conversation).where(Conversation.user_id == user_id).order_by(Conversation.id)))

    def append_message(self, user_id: int, conversation_id: int, role: str, text: str,
                       token_count: int) -> Message:
        message = self._checked_message(user_id, conversation_id, role, text, token_count)
        with self._writing() as session:
            self._lock_user(session, user_id)  # one user's ids in commit order (see module doc)
            self._conversation(session, user_id, conversation_id)
            session.add(message)
        return message

    # --- turns: one chat turn in two transactions ------------------------------------------

    def begin_turn(self, user_id: int, text: str, token_count: int, *, with_history: bool = False) -> TurnStart:
        """Store a user's new message and read what answering it needs, in one transaction.

        The message goes into the user's latest conversation (a new one if they have none). Read
        with it: the latest snapshot, whether it awaits a rebuild, the messages before the new
        one that no usable adapter holds (see TurnStart.pending) and, with_history, all of the
        user's messages (what a chat page shows).
        """
        message = self._checked_message(user_id, None, "user", text, token_count)
        with self._writing() as session:
            user = self._lock_user(session, user_id)  # one user's ids in commit order (see module doc)
            conversation_id = session.scalar(select(Conversation.id).where(Conversation.user_id == user_id)
                                             .order_by(Conversation.id.desc()).limit(1))
            if conversation_id is None:
                conversation = Conversation(user_id=user_id)
                session.add(conversation)
                session.flush()
                conversation_id = conversation.id
            message.conversation_id = conversation_id
            session.add(message)
            session.flush()
            snapshot = self._latest_snapshot(session, user_id)
            cursor = snapshot.cursor if snapshot is not None and not user.needs_rebuild else 0
            pending = session.scalars(select(Message).where(
                Message.user_id == user_id, Message.id > cursor, Message.id < message.id).order_by(Message.id))
            history = None
            if with_history:
                history = tuple(session.scalars(select(Message).where(Message.user_id == user_id)
                                                .order_by(Message.id)))
            return TurnStart(message, snapshot, user.needs_rebuild, tuple(pending), history)

    def finish_turn(self, user_id: int, conversation_id: int, text: str, token_count: int, *,
                    compress_every: int, turn_holder: str | None = None) -> TurnEnd:
        """Store the reply of a turn and, once at least `compress_every` of the user's own messages
        wait after the latest snapshot's cursor, queue their compression; one transaction.
        turn_holder: the web replica that took the user's turn (take_turn); the reply is refused
        (LeaseLost) if it holds it no more: its lease ran out and another replica took the turn."""
        message = self._checked_message(user_id, conversation_id, "assistant", text, token_count)
        threshold = validation.count("compress_every", compress_every)
        with self._writing() as session:
            self._lock_user(session, user_id)
            if turn_holder is not None and session.scalar(
                    select(TurnLease.holder).where(TurnLease.user_id == user_id)) != turn_holder:
                raise LeaseLost(f"user {user_id}'s turn is no longer {turn_holder}'s")
            self._conversation(session, user_id, conversation_id)
            session.add(message)
            session.flush()
            snapshot = self._latest_snapshot(session, user_id)
            waiting = session.scalar(select(func.count(Message.id)).where(
                Message.user_id == user_id, Message.role == "user",
                Message.id > (snapshot.cursor if snapshot is not None else 0)))
            job = self._queue_job(session, user_id) if waiting >= threshold else None
        return TurnEnd(message, job)

    def history(self, user_id: int, conversation_id: int | None = None) -> list[Message]:
        """The user's messages, oldest first; of one conversation if given."""
        with self._reading() as session:
            query = select(Message).where(Message.user_id == user_id)
            if conversation_id is not None:
                self._conversation(session, user_id, conversation_id)
                query = query.where(Message.conversation_id == conversation_id)
            return list(session.scalars(query.order_by(Message.id)))

    def message_counts(self, user_id: int) -> MessageCounts:
        """Messages and tokens absorbed into the adapter and pending, counted in the database."""
        with self._reading() as session:
            return self._message_counts(session, user_id)

    def memory_summary(self, user_id: int) -> MemorySummary:
        """The user, their message counts, latest snapshot and active compression job, in one transaction."""
        with self._reading() as session:
            user = self._user(session, user_id)
            return MemorySummary(user, self._message_counts(session, user_id), self._latest_snapshot(session, user_id),
                                 self._active_job(session, user_id))

    def messages_after(self, user_id: int, cursor: int, limit: int | None = None) -> list[Message]:
        """The user's messages with an id above the cursor, oldest first: what is not absorbed yet."""
        after = validation.count("cursor", cursor)
        query = select(Message).where(Message.user_id == user_id, Message.id > after).order_by(Message.id)
        if limit is not None:
            query = query.limit(validation.count("limit", limit))
        with self._reading() as session:
            return list(session.scalars(query))

    def delete_message(self, user_id: int, message_id: int, *, with_reply: bool = False) -> list[int]:
        """Delete one message; the adapter may hold it, so it is marked for a rebuild from scratch.

        With with_reply, a user's message takes the assistant's reply to it along (the next message
        of the conversation, if the assistant wrote it), in the same transaction: forgetting what
        one said must not leave the answer that repeats it. Returns the ids deleted.
        """
        with self._writing() as session:
            user = self._lock_user(session, user_id)
            message = session.scalars(
                select(Message).where(Message.id == message_id, Message.user_id == user_id)).one_or_none()
            if message is None:
                raise NotFound(f"user {user_id} has no message {message_id}")
            doomed = [message]
            if with_reply and message.role == "user":
                following = session.scalars(select(Message).where(
                    Message.user_id == user_id, Message.conversation_id == message.conversation_id,
                    Message.id > message.id).order_by(Message.id).limit(1)).first()
                if following is not None and following.role == "assistant":
                    doomed.append(following)
            deleted = [m.id for m in doomed]
            for doomed_message in doomed:
                session.delete(doomed_message)
            user.needs_rebuild = True
            user.history_revision += 1
        return deleted

    def request_rebuild(self, user_id: int, *, actor_id: int | None = None) -> None:
        """Mark the user's adapter for a rebuild from the whole history (for example by an admin)."""
        with self._writing() as session:
            user = self._lock_user(session, user_id)
            user.needs_rebuild = True
            if actor_id is not None:
                self._audit(session, actor_id, "rebuild_adapter", user_id, {})

    def reset_memory(self, user_id: int, *, actor_id: int | None = None) -> None:
        """Forget everything the user said: all conversations, messages, snapshots and their files
        go; the account stays."""
        with self._writing() as session:
            user = self._lock_user(session, user_id)
            paths = list(session.scalars(select(AdapterSnapshot.path).where(AdapterSnapshot.user_id == user_id)))
            session.execute(delete(Message).where(Message.user_id == user_id))
            session.execute(delete(AdapterSnapshot).where(AdapterSnapshot.user_id == user_id))
            session.execute(delete(Conversation).where(Conversation.user_id == user_id))
            session.execute(delete(CompressionJob).where(CompressionJob.user_id == user_id,
                                                         CompressionJob.status == "queued"))
            user.needs_rebuild = False
            user.history_revision += 1  # a rebuild that read the old history must not land
            if actor_id is not None:
                self._audit(session, actor_id, "reset_memory", user_id, {"snapshots": len(paths)})
        self._remove_unreferenced(user_id, paths)

    # --- adapter snapshots -----------------------------------------------------------------

    def latest_snapshot(self, user_id: int) -> AdapterSnapshot | None:
        with self._reading() as session:
            return self._latest_snapshot(session, user_id)

    def list_snapshots(self, user_id: int) -> list[AdapterSnapshot]:
        with self._reading() as session:
            return list(session.scalars(
                select(AdapterSnapshot).where(AdapterSnapshot.user_id == user_id).order_by(AdapterSnapshot.version)))

    def read_snapshot(self, user_id: int, snapshot_id: int | None = None) -> bytes:
        """The bytes of a snapshot (the latest if no id is given), checked against their sha256."""
        with self._reading() as session:
            if snapshot_id is None:
                snapshot = self._latest_snapshot(session, user_id)
            else:
                snapshot = session.scalars(select(AdapterSnapshot).where(
                    AdapterSnapshot.id == snapshot_id, AdapterSnapshot.user_id == user_id)).one_or_none()
        if snapshot is None:
            raise NotFound(f"user {user_id} has no adapter snapshot {snapshot_id or ''}".rstrip())
        return self.read_snapshot_file(snapshot)

    def read_snapshot_file(self, snapshot: AdapterSnapshot) -> bytes:
        """The bytes of a snapshot row already read (from its file, or from the database where the
        row says they are), checked against their sha256."""
        if not snapshot.path.startswith(DATABASE_PATH_PREFIX):
            return self.files.read(snapshot.path, snapshot.sha256, snapshot.size_bytes)
        with self._reading() as session:
            data = session.scalar(select(SnapshotBlob.data).where(SnapshotBlob.user_id == snapshot.user_id,
                                                                  SnapshotBlob.sha256 == snapshot.sha256))
        if data is None:
            raise SnapshotFileError(f"adapter snapshot {snapshot.path} is missing from the database")
        if len(data) != snapshot.size_bytes or hashlib.sha256(data).hexdigest() != snapshot.sha256:
            raise SnapshotFileError(f"adapter snapshot {snapshot.path} failed its sha256 check")
        return bytes(data)

    def report_unusable_snapshot(self, user_id: int, snapshot_id: int, details: dict[str, Any],
                                 action: str = "adapter_unreadable") -> list[Message]:
        """A snapshot that cannot be used: mark the adapter for a rebuild from the history, queue it
        and record why in the audit log (`action`: `adapter_unreadable` for a damaged file,
        `adapter_outdated` for one made by another compressor or settings), in one transaction.

        Reported once: nothing is marked again while a rebuild is awaited, nor when a newer snapshot
        has replaced this one meanwhile. Returns all the user's messages, oldest first: until the
        rebuild lands no adapter holds any of them, so answers must show them instead.
        """
        checked_details = validation.json_document("details", details, self.settings)
        with self._writing() as session:
            user = self._lock_user(session, user_id)
            latest = self._latest_snapshot(session, user_id)
            if latest is not None and latest.id == snapshot_id and not user.needs_rebuild:
                user.needs_rebuild = True
                self._audit(session, None, action, user_id, {"version": latest.version} | checked_details)
                self._queue_job(session, user_id)
            return list(session.scalars(select(Message).where(Message.user_id == user_id).order_by(Message.id)))

    def commit_snapshot(self, user_id: int, data: bytes, *, generator_id: str, base_model_id: str,
                        cursor: int, tokens_absorbed: int, stats: dict[str, Any] | None = None,
                        rebuild_revision: int | None = None, claim: JobClaim | None = None) -> AdapterSnapshot:
        """Store a new adapter state that has absorbed the user's messages up to `cursor`.

        The file is made durable first, then the row is committed together with the marks on
        the messages it absorbed, so a crash leaves at worst an orphan file, never a row without
        its file. A plain commit must move the cursor forward onto one of the user's messages.

        A rebuild from scratch (after a message deletion, or for a new generator) passes the
        `history_revision` the user had when the rebuild started reading the history: it may
        put the cursor anywhere (0 when no message is left), clears `needs_rebuild`, and replaces
        all older snapshots, which may hold deleted messages. It is refused if yet another
        message was deleted meanwhile.

        claim: the compression job's run that made it; refused (LeaseLost) unless that run still
        holds the job, so that a worker whose lease ran out never stores what another worker is
        absorbing again.
        """
        payload = self._snapshot_payload(data)
        checked_generator = validation.identifier("generator_id", generator_id, ID_MAX_CHARS)
        checked_model = validation.identifier("base_model_id", base_model_id, ID_MAX_CHARS)
        checked_cursor = validation.count("cursor", cursor)
        tokens = validation.count("tokens_absorbed", tokens_absorbed, BIGINT_MAX)
        checked_stats = validation.json_document("stats", stats, self.settings)
        rebuild = rebuild_revision is not None
        with self._writing() as session:
            user = self._lock_user(session, user_id)
            if claim is not None and self._running_job(session, claim.job_id, claim).user_id != user_id:
                raise StorageError(f"compression job {claim.job_id} is not user {user_id}'s")
            latest = self._latest_snapshot(session, user_id)
            previous = self._check_commit(session, user, latest, checked_cursor,
                                          (checked_generator, checked_model), rebuild_revision)
            stored = self._store_bytes(session, user_id, payload)
            snapshot = AdapterSnapshot(
                user_id=user_id, version=latest.version + 1 if latest else 1, generator_id=checked_generator,
                base_model_id=checked_model, path=stored.path, sha256=stored.sha256, size_bytes=stored.size,
                cursor=checked_cursor, tokens_absorbed=tokens, stats=checked_stats)
            session.add(snapshot)
            session.flush()
            replaced: list[str] = []
            if not rebuild:
                session.execute(update(Message)
                                .where(Message.user_id == user_id, Message.id > previous, Message.id <= checked_cursor)
                                .values(snapshot_id=snapshot.id))
            else:
                # absorbed again up to the cursor; later messages wait for the next commit
                session.execute(update(Message).where(Message.user_id == user_id).values(
                    snapshot_id=case((Message.id <= checked_cursor, snapshot.id), else_=None)))
                user.needs_rebuild = False
                older = (AdapterSnapshot.user_id == user_id) & (AdapterSnapshot.id != snapshot.id)
                replaced = list(session.scalars(select(AdapterSnapshot.path).where(older)))
                session.execute(delete(AdapterSnapshot).where(older))
        self._remove_unreferenced(user_id, replaced)
        return snapshot

    def remove_orphan_files(self, min_age_s: float = 3600.0) -> list[str]:
        """Delete snapshot files that no row refers to and that are older than min_age_s."""
        with self._reading() as session:
            referenced = set(session.scalars(select(AdapterSnapshot.path)))
            users = set(session.scalars(select(User.id)))
        return self.files.remove_orphans(referenced, users, min_age_s)

    # --- compression jobs ------------------------------------------------------------------

    def queue_job(self, user_id: int) -> CompressionJob:
        """Ask for the user's new messages to be absorbed; at most one job is queued or running.

        With a job already queued, that job is returned. With one running (it may have read the
        messages before the newest one), it is flagged so that finishing it queues a follow-up.
        """
        with self._writing() as session:
            self._lock_user(session, user_id)
            return self._queue_job(session, user_id)

    def claim_job(self) -> CompressionJob | None:
        """Take the oldest due queued job, or a running one whose worker's lease ran out (its worker
        died or hangs), and mark it running under a new lease; None when there is none. The
        returned job's `claim` is what its worker shows to renew the lease, commit and finish.

        On PostgreSQL, FOR UPDATE SKIP LOCKED lets several workers claim at once without waiting
        on each other; the conditional UPDATE makes a double claim impossible on any backend. A
        user never has two running jobs: the database allows one active job per user. A job taken
        over counts its interrupted run as failed: after the last attempt it is marked failed.
        """
        with self._writing() as session:
            now = self._lease_clock(session)
            due = (CompressionJob.status == "queued") & (CompressionJob.not_before <= now)
            abandoned = (CompressionJob.status == "running") & (
                CompressionJob.lease_until.is_(None) | (CompressionJob.lease_until < now))
            job = session.scalars(
                select(CompressionJob).where(due | abandoned)
                .order_by(CompressionJob.not_before, CompressionJob.id)
                .limit(1)
                .with_for_update(skip_locked=True)).first()
            if job is None:
                return None
            if job.status == "running" and job.attempts >= self.settings.job_max_attempts:
                # failed for good (its attempts are spent). Not through _running_job: that locks the
                # user after this job, the reverse of every other job change's order: a deadlock
                self._after_failure(session, job, TAKEN_OVER)
                return None  # the caller polls again
            claimed = session.execute(
                update(CompressionJob)
                .where(CompressionJob.id == job.id, due | abandoned)
                .values(status="running", attempts=CompressionJob.attempts + 1, started_at=now,
                        lease_until=now + timedelta(seconds=self.settings.job_lease_s),
                        error=case((CompressionJob.status == "running", TAKEN_OVER), else_=CompressionJob.error))
                .execution_options(synchronize_session=False))
            if claimed.rowcount != 1:
                return None  # another worker took it first; the caller simply polls again
            session.refresh(job)
        return job

    def renew_lease(self, claim: JobClaim) -> bool:
        """Extend a running job's lease by job_lease_s from now; False if this run no longer holds
        the job (taken over after its lease ran out, or ended)."""
        with self._writing() as session:
            renewed = session.execute(
                update(CompressionJob)
                .where(CompressionJob.id == claim.job_id, CompressionJob.status == "running",
                       CompressionJob.attempts == claim.attempt)
                .values(lease_until=self._lease_clock(session) + timedelta(seconds=self.settings.job_lease_s))
                .execution_options(synchronize_session=False))
            return renewed.rowcount == 1

    def active_job(self, user_id: int) -> CompressionJob | None:
        """The user's queued or running job, if any."""
        with self._reading() as session:
            return self._active_job(session, user_id)

    def pending_users(self) -> list[tuple[int, int, datetime]]:
        """(user id, messages not absorbed yet, time of the newest one) for every user with any."""
        query = (select(Message.user_id, func.count(Message.id), func.max(Message.created_at))
                 .where(Message.snapshot_id.is_(None)).group_by(Message.user_id).order_by(Message.user_id))
        with self._reading() as session:
            return [(user_id, count, _as_utc(newest)) for user_id, count, newest in session.execute(query)]

    def get_job(self, job_id: int) -> CompressionJob:
        with self._reading() as session:
            job = session.get(CompressionJob, job_id)
            if job is None:
                raise NotFound(f"no compression job {job_id}")
            return job

    def finish_job(self, job_id: int, claim: JobClaim | None = None) -> CompressionJob | None:
        """Mark a running job done; returns the follow-up job if it was asked for again meanwhile.
        claim: the run that finishes it (LeaseLost if that run no longer holds the job)."""
        with self._writing() as session:
            job = self._running_job(session, job_id, claim)
            job.status, job.finished_at, job.error, job.lease_until = "done", utcnow(), None, None
            return self._follow_up(session, job)

    def fail_job(self, job_id: int, error: str, claim: JobClaim | None = None) -> CompressionJob:
        """Record a failed run: retried after an exponential backoff, 'failed' after the last attempt.
        claim: as finish_job's."""
        with self._writing() as session:
            job = self._running_job(session, job_id, claim)
            self._after_failure(session, job, error)
        return job

    def requeue_stale_jobs(self, started_before: datetime | None = None) -> int:
        """Jobs left 'running' by a process that stopped count as failed runs; call on start.

        With several worker processes, pass `started_before` (for example the time this process
        started) so that jobs other live workers are running stay theirs. Returns how many.
        """
        query = select(CompressionJob.id).where(CompressionJob.status == "running")
        if started_before is not None:
            query = query.where(CompressionJob.started_at < started_before)
        requeued = 0
        with self._writing() as session:
            for job_id in list(session.scalars(query.order_by(CompressionJob.id))):
                try:
                    job = self._running_job(session, job_id)
                except StorageError:
                    continue  # finished, or its user deleted, since the query
                self._after_failure(session, job, "interrupted: the process running it stopped")
                requeued += 1
        return requeued

    # --- download links ------------------------------------------------------------------------

    def downloads_revisions(self, *user_ids: int) -> tuple[int, ...]:
        """Each user's downloads_revision (0 for one that no longer exists): read before an export
        is built, handed to add_download after it."""
        with self._reading() as session:
            known = dict(session.execute(select(User.id, User.downloads_revision).where(User.id.in_(user_ids))).all())
        return tuple(known.get(u, 0) for u in user_ids)

    def add_download(self, token: str, owner_id: int, subject_id: int, address: str | None, filename: str,
                     data: bytes, expires_at: datetime, revisions: tuple[int, int]) -> bool:
        """Store a link to `data` for its owner, replacing the owner's older links; False (nothing
        stored) if the owner's or the subject's links were revoked since `revisions` were read
        (downloads_revisions(owner_id, subject_id)), or either no longer exists."""
        with self._writing() as session:
            users = {u: self._lock_user_or_none(session, u) for u in sorted({owner_id, subject_id})}
            now_revisions = tuple(users[u].downloads_revision if users[u] else None for u in (owner_id, subject_id))
            if now_revisions != tuple(revisions):
                return False
            session.execute(delete(DownloadLink).where(DownloadLink.owner_id == owner_id))
            session.add(DownloadLink(token_hash=_key_hash(token), owner_id=owner_id, subject_id=subject_id,
                                     address=address, filename=filename, expires_at=expires_at, data=bytes(data)))
            return True

    def find_download(self, token: object, address: str | None) -> DownloadLink | None:
        """The live link with this token for this address (None: unknown, expired, or for another address)."""
        if not isinstance(token, str) or not token or not token.isascii():
            return None
        with self._reading() as session:
            link = session.scalars(select(DownloadLink).where(DownloadLink.token_hash == _key_hash(token))).one_or_none()
        if link is None or _as_utc(link.expires_at) <= utcnow() or (link.address is not None and link.address != address):
            return None
        return link

    def remove_download(self, token: str) -> None:
        with self._writing() as session:
            session.execute(delete(DownloadLink).where(DownloadLink.token_hash == _key_hash(token)))

    def revoke_downloads(self, user_id: int) -> None:
        """Delete every link the user holds or whose data is theirs, and refuse those being built now."""
        with self._writing() as session:
            session.execute(update(User).where(User.id == user_id)
                            .values(downloads_revision=User.downloads_revision + 1))
            session.execute(delete(DownloadLink).where(
                (DownloadLink.owner_id == user_id) | (DownloadLink.subject_id == user_id)))

    def remove_expired_downloads(self, now: datetime | None = None) -> int:
        """Delete the links that expired; how many."""
        with self._writing() as session:
            return session.execute(delete(DownloadLink).where(DownloadLink.expires_at <= (now or utcnow()))).rowcount

    # --- one turn at a time, across web replicas ----------------------------------------------

    def take_turn(self, user_id: int, holder: str) -> bool:
        """Hold the user's turn for turn_lease_s on behalf of `holder` (a replica process); False
        while another holder's lease on it runs. NotFound for a user that no longer exists."""
        with self._writing() as session:
            self._lock_user(session, user_id)  # one taker at a time per user, on every backend
            now = self._lease_clock(session)
            lease = session.get(TurnLease, user_id, with_for_update=True)
            if lease is not None and lease.holder != holder and _as_utc(lease.lease_until) > now:
                return False
            until = now + timedelta(seconds=self.settings.turn_lease_s)
            if lease is None:
                session.add(TurnLease(user_id=user_id, holder=holder, lease_until=until))
            else:
                lease.holder, lease.lease_until = holder, until
            return True

    def renew_turn(self, user_id: int, holder: str) -> bool:
        """Extend the holder's lease on the user's turn; False if it holds it no more."""
        with self._writing() as session:
            renewed = session.execute(
                update(TurnLease).where(TurnLease.user_id == user_id, TurnLease.holder == holder)
                .values(lease_until=self._lease_clock(session) + timedelta(seconds=self.settings.turn_lease_s))
                .execution_options(synchronize_session=False))
            return renewed.rowcount == 1

    def end_turn(self, user_id: int, holder: str) -> None:
        """Give the user's turn back (nothing if the holder no longer has it)."""
        with self._writing() as session:
            session.execute(delete(TurnLease).where(TurnLease.user_id == user_id, TurnLease.holder == holder))

    # --- audit log -------------------------------------------------------------------------

    def record_audit(self, actor_id: int | None, action: str, target_user_id: int | None = None,
                     details: dict[str, Any] | None = None) -> AuditEntry:
        with self._writing() as session:
            return self._audit(session, actor_id, action, target_user_id, details)

    def list_audit(self, *, target_user_id: int | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first."""
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(validation.count("limit", limit))
        if target_user_id is not None:
            query = query.where(AuditEntry.target_user_id == target_user_id)
        with self._reading() as session:
            return list(session.scalars(query))

    # --- helpers ---------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._read.begin() as session:
            yield session

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write.begin() as session:
            yield session

    def _name_refusal(self, name: str) -> UsernameTaken:
        """Why the database refused a new name: it is taken, or its skeleton is (a look-alike)."""
        with self._reading() as session:
            taken = session.scalar(select(User.id).where(User.username == name)) is not None
        return UsernameTaken(name) if taken else UsernameLookAlike(name)

    def _verify(self, password_hash: str, secret: str) -> bool:
        try:
            return self._hasher.verify(password_hash, secret)
        except (VerificationError, InvalidHashError):
            return False

    @staticmethod
    def _user(session: Session, user_id: int) -> User:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound(f"no user {user_id}")
        return user

    @staticmethod
    def _lease_clock(session: Session) -> datetime:
        """Now, for leases that processes on several machines write and compare: the database's
        clock on PostgreSQL (a machine whose clock runs ahead must not take over live leases),
        this machine's on SQLite (one machine)."""
        if session.get_bind().dialect.name == "postgresql":
            return _as_utc(session.scalar(select(func.now())))
        return utcnow()

    @classmethod
    def _lock_user_or_none(cls, session: Session, user_id: int) -> User | None:
        try:
            return cls._lock_user(session, user_id)
        except NotFound:
            return None

    @staticmethod
    def _lock_user(session: Session, user_id: int) -> User:
        user = session.scalars(select(User).where(User.id == user_id).with_for_update(key_share=True)).one_or_none()
        if user is None:
            raise NotFound(f"no user {user_id}")
        return user

    @staticmethod
    def _conversation(session: Session, user_id: int, conversation_id: int) -> Conversation:
        conversation = session.scalars(select(Conversation).where(
            Conversation.id == conversation_id, Conversation.user_id == user_id)).one_or_none()
        if conversation is None:
            raise NotFound(f"user {user_id} has no conversation {conversation_id}")
        return conversation

    def _checked_message(self, user_id: int, conversation_id: int | None, role: str, text: str,
                         token_count: int) -> Message:
        """A new message row, its input checked before any transaction starts."""
        return Message(user_id=user_id, conversation_id=conversation_id, role=validation.role(role),
                       text=validation.message_text(text, self.settings),
                       token_count=validation.count("token_count", token_count))

    @staticmethod
    def _active_job(session: Session, user_id: int) -> CompressionJob | None:
        return session.scalars(select(CompressionJob).where(
            CompressionJob.user_id == user_id, CompressionJob.status.in_(("queued", "running")))).one_or_none()

    def _queue_job(self, session: Session, user_id: int) -> CompressionJob:
        """See queue_job; the caller holds the user's lock."""
        job = self._active_job(session, user_id)
        if job is None:
            job = CompressionJob(user_id=user_id)
            session.add(job)
            session.flush()
        elif job.status == "running":
            job.rerun = True
        return job

    @staticmethod
    def _message_counts(session: Session, user_id: int) -> MessageCounts:
        absorbed = Message.snapshot_id.is_not(None)
        messages, absorbed_messages, absorbed_tokens, tokens = session.execute(
            select(func.count(Message.id),
                   func.coalesce(func.sum(case((absorbed, 1), else_=0)), 0),
                   func.coalesce(func.sum(case((absorbed, Message.token_count), else_=0)), 0),
                   func.coalesce(func.sum(Message.token_count), 0)).where(Message.user_id == user_id)).one()
        return MessageCounts(messages, absorbed_messages, absorbed_tokens, messages - absorbed_messages,
                             tokens - absorbed_tokens)

    @staticmethod
    def _latest_snapshot(session: Session, user_id: int) -> AdapterSnapshot | None:
        return session.scalars(select(AdapterSnapshot).where(AdapterSnapshot.user_id == user_id)
                               .order_by(AdapterSnapshot.version.desc()).limit(1)).first()

    def _snapshot_payload(self, data: object) -> bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValidationError("data", f"must be bytes, not {type(data).__name__}")
        payload = bytes(data)
        if not payload:
            raise ValidationError("data", "is empty")
        if len(payload) > self.settings.snapshot_max_bytes:
            raise ValidationError("data", f"is larger than {self.settings.snapshot_max_bytes} bytes")
        return payload

    @staticmethod
    def _check_commit(session: Session, user: User, latest: AdapterSnapshot | None, cursor: int,
                      made_by: tuple[str, str], rebuild_revision: int | None) -> int:
        """Refuse a commit that would lose, repeat or mix up messages; returns the cursor it follows."""
        if rebuild_revision is not None:
            if rebuild_revision != user.history_revision:
                raise RebuildRequired(f"user {user.id}'s history changed during the rebuild (revision "
                                      f"{rebuild_revision}, now {user.history_revision}): rebuild again")
            previous = 0
        else:
            if user.needs_rebuild:
                raise RebuildRequired(f"user {user.id} deleted messages the adapter may hold: rebuild it "
                                      "from the whole history (commit_snapshot with rebuild_revision)")
            if latest is not None and (latest.generator_id, latest.base_model_id) != made_by:
                raise RebuildRequired(f"the latest snapshot was made by generator {latest.generator_id!r} for "
                                      f"{latest.base_model_id!r}: another generator or model must rebuild it")
            previous = latest.cursor if latest else 0
            if cursor <= previous:
                raise CursorError(f"cursor {cursor} does not move past the latest snapshot's cursor {previous}")
        own = select(Message.id).where(Message.id == cursor, Message.user_id == user.id)
        if cursor and session.scalar(own) is None:
            raise CursorError(f"cursor {cursor} is not one of user {user.id}'s messages")
        return previous

    def _store_bytes(self, session: Session, user_id: int, payload: bytes) -> StoredFile:
        """A new snapshot's bytes where snapshot_store says: a durable file (written before the row,
        see commit_snapshot), or a blob row in the commit's own transaction."""
        if self.settings.snapshot_store == "files":
            return self.files.write(user_id, payload)
        digest = hashlib.sha256(payload).hexdigest()
        known = select(SnapshotBlob.id).where(SnapshotBlob.user_id == user_id, SnapshotBlob.sha256 == digest)
        if session.scalar(known) is None:  # the same bytes again (content-addressed): stored once
            session.add(SnapshotBlob(user_id=user_id, sha256=digest, data=payload))
        return StoredFile(f"{DATABASE_PATH_PREFIX}user-{user_id}/{digest}", digest, len(payload))

    def _remove_unreferenced(self, user_id: int, paths: list[str]) -> None:
        """Delete replaced snapshots' bytes, under the user's lock (no commit can write any meanwhile)."""
        if not paths:
            return
        with self._writing() as session:
            self._lock_user(session, user_id)
            kept = set(session.scalars(select(AdapterSnapshot.path).where(AdapterSnapshot.path.in_(paths))))
            for path in set(paths) - kept:
                if path.startswith(DATABASE_PATH_PREFIX):
                    session.execute(delete(SnapshotBlob).where(SnapshotBlob.user_id == user_id,
                                                               SnapshotBlob.sha256 == path.rsplit("/", 1)[-1]))
                else:
                    self.files.remove(path)

    def _running_job(self, session: Session, job_id: int, claim: JobClaim | None = None) -> CompressionJob:
        """The job, locked after its user (the order every job change follows); it must be running
        (and still under the claim's run, if one is given: else LeaseLost)."""
        user_id = session.scalar(select(CompressionJob.user_id).where(CompressionJob.id == job_id))
        if user_id is None:
            raise NotFound(f"no compression job {job_id}")
        self._lock_user(session, user_id)
        job = session.scalars(select(CompressionJob).where(CompressionJob.id == job_id)
                              .with_for_update().execution_options(populate_existing=True)).one()
        if claim is not None and (job.status != "running" or job.attempts != claim.attempt):
            raise LeaseLost(f"compression job {job_id}'s run {claim.attempt} no longer holds it (now {job.status}, "
                            f"run {job.attempts})")
        if job.status != "running":
            raise StorageError(f"compression job {job_id} is {job.status}, not running")
        return job

    def _after_failure(self, session: Session, job: CompressionJob, error: str) -> None:
        now = utcnow()
        job.error = _storable_error(error)
        job.lease_until = None
        if job.attempts < self.settings.job_max_attempts:
            job.status, job.rerun = "queued", False  # the retry reads the newer messages too
            job.not_before = now + timedelta(seconds=self.settings.retry_delay_s(job.attempts))
        else:
            job.status, job.finished_at = "failed", now
            self._follow_up(session, job)

    @staticmethod
    def _follow_up(session: Session, job: CompressionJob) -> CompressionJob | None:
        if not job.rerun:
            return None
        session.flush()  # the finished job leaves the active set before its follow-up enters it
        follow_up = CompressionJob(user_id=job.user_id)
        session.add(follow_up)
        session.flush()
        return follow_up

    def _audit(self, session: Session, actor_id: int | None, action: str, target_user_id: int | None,
               details: dict[str, Any] | None) -> AuditEntry:
        checked_action = validation.identifier("action", action, ACTION_MAX_CHARS)
        checked_details = validation.json_document("details", details, self.settings)
        names = {user_id: self._user(session, user_id).username for user_id in {actor_id, target_user_id} - {None}}
        entry = AuditEntry(actor_id=actor_id, action=checked_action, target_user_id=target_user_id,
                           actor_name=names.get(actor_id), target_name=names.get(target_user_id),
                           details=checked_details)
        session.add(entry)
        session.flush()
        return entry


def is_api_key(value: object) -> bool:
    """Whether the value has the form of an API key (checked before any hashing or lookup)."""
    return isinstance(value, str) and _API_KEY.fullmatch(value) is not None


def _key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _as_utc(value: datetime) -> datetime:
    """An aggregate bypasses the column type, so SQLite hands back a naive (UTC) datetime."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _storable_error(error: object) -> str:
    """Error text from a worker, made safe for any database (no NUL, no lone surrogates)."""
    text = str(error)[:ERROR_MAX_CHARS].replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")
