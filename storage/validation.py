"""Checks on everything a user or the app hands to storage, done before any write.

Each check returns the value to store or raises ValidationError naming the field and the reason.
Lengths are checked first, so that a huge payload is refused before it is scanned or normalised.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from .errors import ValidationError
from .settings import StorageSettings

ROLES = ("user", "assistant")
MAX_INT = 2**31 - 1
"""Largest value of a 32-bit INTEGER column (PostgreSQL's INTEGER is 32-bit)."""

_USERNAME_PUNCTUATION = frozenset("._-")
_MESSAGE_CONTROLS = frozenset("\n\t")


def username(value: object, settings: StorageSettings) -> str:
    """NFKC + casefold, so that 'Alice', 'ALICE' and full-width 'Ａｌｉｃｅ' are one account."""
    text = _text("username", value, settings.username_max_chars)
    text = unicodedata.normalize("NFKC", text).casefold()
    _check_length("username", text, settings.username_max_chars)
    _refuse_controls("username", text)
    for ch in text:
        category = unicodedata.category(ch)
        if ch.isspace() or category[0] == "Z":
            raise ValidationError("username", f"contains a space ({_name(ch)})")
        if category[0] == "C":
            raise ValidationError("username", f"contains an invisible character ({_name(ch)})")
        if category[0] not in "LNM" and ch not in _USERNAME_PUNCTUATION:
            raise ValidationError("username", f"may hold only letters, digits, '.', '_' and '-', not {_name(ch)}")
    return text


def password(value: object, settings: StorageSettings, *, new: bool = True) -> str:
    """NFKC (as NIST SP 800-63B advises), so a password typed on another keyboard still matches.

    The minimum length applies to new passwords only: raising it must not lock anyone out.
    """
    text = _text("password", value, settings.password_max_chars)
    text = unicodedata.normalize("NFKC", text)
    _check_length("password", text, settings.password_max_chars)
    if new and len(text) < settings.password_min_chars:
        raise ValidationError("password", f"is shorter than {settings.password_min_chars} characters")
    return text


def message_text(value: object, settings: StorageSettings) -> str:
    """Kept as typed, except that CRLF and CR become LF (browsers send CRLF from a textarea)."""
    text = _text("text", value, settings.message_max_chars)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ValidationError("text", "is empty")
    _refuse_controls("text", text, allowed=_MESSAGE_CONTROLS)
    return text


def title(value: object, settings: StorageSettings) -> str | None:
    if value is None:
        return None
    text = _text("title", value, settings.title_max_chars)
    _refuse_controls("title", text)
    return text


def identifier(field: str, value: object, max_chars: int) -> str:
    """A short machine-made name (generator id, base model id, audit action)."""
    text = _text(field, value, max_chars)
    _refuse_controls(field, text)
    if text != text.strip():
        raise ValidationError(field, "starts or ends with a space")
    return text


def role(value: object) -> str:
    if value not in ROLES:
        raise ValidationError("role", f"must be one of {', '.join(ROLES)}, not {value!r}")
    return str(value)


def count(field: str, value: object, maximum: int = MAX_INT) -> int:
    """A non-negative integer (bool is refused: True is not a token count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValidationError(field, f"must be between 0 and {maximum}, not {value}")
    return value


def json_document(field: str, value: object, settings: StorageSettings) -> dict[str, Any]:
    """A JSON object small enough to store, with strings the database can hold."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(field, f"must be a dict, not {type(value).__name__}")
    try:
        # ensure_ascii=False lets encode() find lone surrogates, which JSON escapes would hide
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise ValidationError(field, f"is not storable as JSON ({e})") from e
    if len(encoded) > settings.json_max_bytes:
        raise ValidationError(field, f"is larger than {settings.json_max_bytes} bytes as JSON")
    return json.loads(encoded)


def _text(field: str, value: object, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be text, not {type(value).__name__}")
    _check_length(field, value, max_chars)
    if not value:
        raise ValidationError(field, "is empty")
    if "\x00" in value:
        raise ValidationError(field, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValidationError(field, f"is not valid Unicode (lone surrogate at position {e.start})") from e
    return value


def _check_length(field: str, text: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise ValidationError(field, f"is longer than {max_chars} characters ({len(text)})")


def _refuse_controls(field: str, text: str, allowed: frozenset[str] = frozenset()) -> None:
    for ch in text:
        if unicodedata.category(ch) == "Cc" and ch not in allowed:
            raise ValidationError(field, f"contains a control character ({_name(ch)})")


def _name(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, '')}".rstrip()
