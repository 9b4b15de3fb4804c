"""What the app refuses on purpose, told apart from what goes wrong.

A refusal is an `AppError`: the person's to fix, its message written for them, shown as it is,
and the log gets one line. Storage's own errors are not refusals by themselves: the services
translate them (`refusing`) where they are the person's mistake (a name taken, a message too
long, a message id that is not theirs). Anything else is a fault: the log gets the traceback and
the person a generic message with a reference to find it in the log.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

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


class ServerStopping(AppError):
    """The server shuts down (the inference loop stopped): nothing is wrong with the request, which
    may be sent again once the server is back."""

    def __init__(self, message: str = "The server is stopping; try again shortly.") -> None:
        super().__init__(message)


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
    if isinstance(error, AppError):
        log.info("refused %s: %s", action, user_message(error))
        return user_message(error)
    reference = secrets.token_hex(4)
    log.error("%s failed (reference %s)", action, reference, exc_info=error)
    return f"Something went wrong on our side (reference {reference}). Please try again in a moment."
