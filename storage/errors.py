"""The errors storage raises, so that the app can tell a user's mistake from a broken system."""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error raised on purpose by storage."""


class ValidationError(StorageError, ValueError):
    """Input refused before anything was written; says which field and why, in words fit for a user."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UsernameTaken(ValidationError):
    """The (normalised) username belongs to another account already."""

    def __init__(self, username: str) -> None:
        super().__init__("username", f"{username!r} is already taken")


class UsernameLookAlike(UsernameTaken):
    """The username looks like another account's (the same Unicode TS #39 skeleton): the Cyrillic
    'ѕсоре' next to 'scope', or 'rnodern' next to 'modern'. A kind of UsernameTaken, so that code
    which handles a taken name handles this one too."""

    def __init__(self, username: str) -> None:
        ValidationError.__init__(self, "username", f"{username!r} looks too much like an existing account")


class NotFound(StorageError, LookupError):
    """No such row, or a row that belongs to another user (the two are not told apart on purpose)."""


class CursorError(StorageError, ValueError):
    """A snapshot cursor that goes backwards, or points at a message that is not the user's."""


class RebuildRequired(StorageError):
    """History changed since the adapter was built: it must be rebuilt from scratch first."""


class SnapshotFileError(StorageError):
    """An adapter snapshot file that is missing, or whose bytes no longer match their sha256."""


class LeaseLost(StorageError):
    """A compression job's run that no longer holds the job: its lease ran out and another worker
    took the job over, or the job ended meanwhile. What the run made is not stored."""
