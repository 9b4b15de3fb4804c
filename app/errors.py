"""What the app refuses on purpose, told apart from what goes wrong.

A refusal (an `AppError`, or storage's ValidationError / NotFound) is the person's to fix: its
message is shown to them as it is and the log gets one line. Anything else is a fault: the log
gets the traceback and the person a generic message with a reference to find it in the log.
"""

from __future__ import annotations

import logging
import secrets

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


REFUSALS = (AppError, ValidationError, NotFound)
"""Every exception whose message is meant for the person; anything else is a fault."""

_FIELD_WORDS = {"username": "The username", "password": "The password", "text": "The message",
                "question": "The question", "user": "That user"}


def user_message(error: BaseException) -> str:
    """The words shown for a refusal: storage's 'text: is empty' becomes 'The message is empty.'"""
    if isinstance(error, ValidationError):
        text = f"{_FIELD_WORDS.get(error.field, error.field.capitalize())} {error.reason}"
    elif isinstance(error, NotFound):
        text = "That no longer exists, or is not yours."
    else:
        text = str(error)
    return text if text.endswith((".", "?", "!")) else text + "."


def describe(error: BaseException, action: str) -> str:
    """Log a refusal in one line or a fault with its traceback; the words to show the person."""
    if isinstance(error, REFUSALS):
        log.info("refused %s: %s", action, user_message(error))
        return user_message(error)
    reference = secrets.token_hex(4)
    log.error("%s failed (reference %s)", action, reference, exc_info=error)
    return f"Something went wrong on our side (reference {reference}). Please try again in a moment."
