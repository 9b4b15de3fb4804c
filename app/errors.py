"""What the app refuses on purpose, told apart from what goes wrong.

A refusal is an `AppError`: the person's to fix, its message written for them, shown as it is,
and the log gets one line. Storage's own errors are not refusals by themselves: the services
translate them (`refusing`) where they are the person's mistake (a name taken, a message too
long, a message id that is not theirs). An outage of what the replicas share (the database, the
rate limits' Redis) is neither: the request is refused as Unavailable (503), the log gets one
line, and the same request works once the store is back. Anything else is a fault: the log gets
the traceback and the person a generic message with a reference to find it in the log.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions
from limits.errors import StorageError as LimitsStorageError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from storage import NotFound, ValidationError

log = logging.getLogger(__name__)


class AppError(Exception):
    """A refusal whose message is written for the person who made the request."""


class AccessDenied(AppError):
    """The acting user may not do this (not logged in, or not an admin)."""


class LoginFailed(AppError):
    """Unknown user or wrong password (the two are not told apart)."""


class RateLimited(AppError):
    """Too many requests of one kind in a short time."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidInput(AppError):
    """What the person typed or chose cannot be taken: which field, and why in words for them."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{_FIELD_WORDS.get(field, field.capitalize())} {reason}")
        self.field = field
        self.reason = reason


class TooLong(InvalidInput):
    """What the person sent is longer than the app or the model takes (an API answers 413 for it)."""


class Busy(AppError):
    """The person's previous request of this kind is still running (their turn being answered)."""


class ReplyNotSaved(AppError):
    """A reply stopped unsaved: the web replica answering it stalled past its turn's lease and
    another replica answered a later message of the same person meanwhile (the message is kept).
    Sending the message again would store it twice: not a request to retry as it is."""


class ServerStopping(AppError):
    """The server shuts down (the inference loop stopped): nothing is wrong with the request, which
    may be sent again once the server is back."""

    def __init__(self, message: str = "The server is stopping; try again shortly.") -> None:
        super().__init__(message)


class Unavailable(AppError):
    """The database or the shared store cannot be reached just now (an outage, a restart): nothing
    is wrong with the request, which may be sent again in a moment."""

    def __init__(self, message: str = "The server cannot reach its database just now; please try again in a "
                                      "moment.") -> None:
        super().__init__(message)


DATABASE_OUTAGES = (OperationalError, InterfaceError)
"""SQLAlchemy's errors a database that cannot be reached or dropped the connection raises (among
others: see _unreachable)."""
_CONNECTION_STATES = ("08", "57P01", "57P02", "57P03")
"""SQLSTATEs of a lost or refused connection (class 08) and of a server shutting down or starting."""


def _unreachable(error: DBAPIError) -> bool:
    """Whether a database error means it cannot be reached (not a deadlock, a timeout or a bad query,
    which are faults): a dropped connection, no SQLSTATE at all (the connection never opened), a
    connection SQLSTATE, or SQLite's lock held too long."""
    if error.connection_invalidated:
        return True
    state = getattr(error.orig, "sqlstate", None)
    if isinstance(error.orig, sqlite3.Error):
        return "locked" in str(error.orig)
    return state is None or state.startswith(_CONNECTION_STATES)
STORE_OUTAGES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, LimitsStorageError)
"""The rate limits' Redis out of reach."""
OUTAGES = DATABASE_OUTAGES + STORE_OUTAGES


def as_outage(error: BaseException) -> Unavailable | None:
    """The refusal for an error that means the database or Redis is out of reach, else None."""
    if isinstance(error, Unavailable):
        return error
    if isinstance(error, DBAPIError) and (isinstance(error, DATABASE_OUTAGES) or error.connection_invalidated) \
            and _unreachable(error):
        return Unavailable()
    if isinstance(error, STORE_OUTAGES):
        return Unavailable("The server cannot reach its shared store just now; please try again in a moment.")
    return None


class Gone(AppError):
    """What the person chose does not exist, or is not theirs (the two are not told apart)."""

    def __init__(self) -> None:
        super().__init__("That no longer exists, or is not yours")


_FIELD_WORDS = {"username": "The username", "password": "The password", "text": "The message",
                "question": "The question", "instructions": "The system message", "key": "A new key",
                "name": "The key's name", "time zone": "The time zone"}


@contextmanager
def refusing() -> Iterator[None]:
    """Storage's refusals inside, as the person's own mistake: its ValidationError becomes
    InvalidInput and NotFound becomes Gone. Only for calls on what the person typed or chose."""
    try:
        yield
    except ValidationError as e:
        raise InvalidInput(e.field, e.reason) from e
    except NotFound as e:
        raise Gone() from e


def user_message(error: AppError) -> str:
    """The words shown for a refusal, ending as a sentence does."""
    text = str(error)
    return text if text.endswith((".", "?", "!")) else text + "."


def describe(error: BaseException, action: str) -> str:
    """Log a refusal in one line or a fault with its traceback; the words to show the person."""
    outage = as_outage(error)
    if outage is not None:
        log.warning("refused %s: %s (%s)", action, user_message(outage), type(error).__name__)
        return user_message(outage)
    if isinstance(error, AppError):
        log.info("refused %s: %s", action, user_message(error))
        return user_message(error)
    reference = secrets.token_hex(4)
    log.error("%s failed (reference %s)", action, reference, exc_info=error)
    return f"Something went wrong on our side (reference {reference}). Please try again in a moment."
