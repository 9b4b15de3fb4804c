"""Checks on everything a user or the app hands to storage, done before any write.

Each check returns the value to store or raises ValidationError naming the field and the reason.
Lengths are checked first, so that a huge payload is refused before it is scanned or normalised.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import defaultdict
from typing import Any

from confusable_homoglyphs import categories, confusables

from .errors import ValidationError
from .settings import StorageSettings

ROLES = ("user", "assistant")
MAX_INT = 2**31 - 1
"""Largest value of a 32-bit INTEGER column (PostgreSQL's INTEGER is 32-bit)."""

NORMALIZE_MAX_CHARS = 256
"""normalize_username reads no further than this: longer than any name, and a huge input costs nothing."""

_USERNAME_PUNCTUATION = frozenset("._-")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_MESSAGE_CONTROLS = frozenset("\n\t")
_NEUTRAL_SCRIPTS = frozenset({"COMMON", "INHERITED"})
"""Characters of every script (digits 0-9, '.', '_', '-', most combining marks): they mix with any."""
_SCRIPT_MIXES = (frozenset({"HAN", "HIRAGANA", "KATAKANA"}), frozenset({"HAN", "HANGUL"}),
                 frozenset({"HAN", "BOPOMOFO"}))
"""Scripts one name may mix, because Japanese, Korean and Chinese are written that way (as in the
'highly restrictive' level of Unicode TS #39, less its Latin)."""
_SKELETON_MAX_PASSES = 4
"""Passes of username_skeleton's mapping at most; the data needs two."""


def normalize_username(text: str) -> str:
    """NFKC + casefold and no check, for where a name is only a key and nothing may fail: the app's
    login throttle counts 'Alice', 'ALICE' and full-width 'Ａｌｉｃｅ' as one name this way.

    Never raises for a str, and returns text that can be stored or logged: a lone surrogate
    becomes U+FFFD. Reads at most NORMALIZE_MAX_CHARS characters, so that a huge input is cheap.
    """
    text = _LONE_SURROGATE.sub("\ufffd", text[:NORMALIZE_MAX_CHARS])
    return unicodedata.normalize("NFKC", text).casefold()


def username(value: object, settings: StorageSettings, *, new: bool = True) -> str:
    """NFKC + casefold, so that 'Alice', 'ALICE' and full-width 'Ａｌｉｃｅ' are one account.

    A new name must also not pass for another (see _refuse_look_alikes). Looking up an existing
    name (new=False) skips those rules: accounts made before them must still be able to log in.
    """
    text = _text("username", value, settings.username_max_chars)
    text = normalize_username(text)
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
    if new:
        _refuse_look_alikes(text)
    return text


_FAINT_MARKS = frozenset("\u0307\u0323")
"""Combining dot above and dot below: at a username's size they are easy to miss."""


_FOLDS = str.maketrans({"0": "o", "1": "i", "l": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g"})


def admin_fold(text: str) -> str:
    """A name with everything a reader may take for something else folded away: its skeleton
    (username_skeleton), accents dropped, digits read as the letters they pass for, 'l' as 'i'.
    'adm1n', 'admín', '4dmin' and 'admln' all fold to admin's fold. Sign-up refuses a name that
    folds to an admin's (app/accounts.py): stricter than the look-alike rule every name follows,
    since passing for an admin is what a look-alike is for."""
    skeleton = unicodedata.normalize("NFD", username_skeleton(text))
    return "".join(ch for ch in skeleton if unicodedata.category(ch) != "Mn").casefold().translate(_FOLDS)


def username_skeleton(text: str) -> str:
    """What the name looks like: two names that look alike have the same skeleton (Unicode TS #39).

    'paypal' and 'paypa1' give 'paypal', 'scope' and the Cyrillic 'ѕсоре' give 'scope', 'modern'
    and 'rnodern' give 'rnodern'. The users table keeps it unique, so that sign-up refuses a
    look-alike of an existing account. Computed from normalize_username(text), and like it never
    raises for a str. The character-by-character mapping (after NFD) is repeated until nothing
    changes, since a few prototypes in the data are not their own skeleton; then the name's
    punctuation and faint dots are dropped.
    """
    skeleton = unicodedata.normalize("NFD", normalize_username(text))
    prototypes = _prototypes()
    for _ in range(_SKELETON_MAX_PASSES):
        mapped = unicodedata.normalize("NFD", "".join(prototypes.get(ch, ch) for ch in skeleton))
        if mapped == skeleton:
            break
        skeleton = mapped
    # What is easy to miss on screen goes too: a name's punctuation ('admin.' and '_admin' pass
    # for 'admin') and a faint dot above or below a letter ('ilvarȧ'). Other marks stay: they
    # tell apart 'lê' from 'le', and Hindi or Thai vowel signs from their absence.
    return "".join(ch for ch in skeleton if ch not in _USERNAME_PUNCTUATION and ch not in _FAINT_MARKS)


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


INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
"""Characters of letter or symbol classes that draw nothing: Hangul fillers and the blank Braille pattern."""


def visible(char: str) -> bool:
    """Whether a character draws something: not a space, not a format character (zero-width
    space and joiners, word joiner, BOM, bidi marks: Unicode's Cf), not a lone combining mark,
    not one of INVISIBLE_LETTERS."""
    return not (char.isspace() or unicodedata.category(char) in ("Cf", "Cc", "Mn", "Me", "Zs")
                or char in INVISIBLE_LETTERS)


def message_text(value: object, settings: StorageSettings) -> str:
    """Kept as typed, except that CRLF and CR become LF (browsers send CRLF from a textarea)."""
    text = _text("text", value, settings.message_max_chars)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not any(visible(c) for c in text):
        raise ValidationError("text", "is empty" if not text.strip() else "has no visible character")
    _refuse_controls("text", text, allowed=_MESSAGE_CONTROLS)
    return text


def title(value: object, settings: StorageSettings) -> str | None:
    if value is None:
        return None
    text = _text("title", value, settings.title_max_chars)
    _refuse_controls("title", text)
    return text


def key_name(value: object, max_chars: int) -> str | None:
    """The name of an API key: optional (None or blank: no name), one line, spaces trimmed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = _text("name", value, max_chars).strip()
    _refuse_controls("name", text)
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


def _refuse_look_alikes(name: str) -> None:
    """Rules after Unicode TS #39, so that a new name cannot pass for another: a letter or a digit
    at all ('...' is no name), combining marks only on letters, one kind of digits, and the letters
    of one script ('pаypal' with a Cyrillic 'а' is refused; Japanese may mix Han and kana)."""
    _refuse_stray_marks(name)
    scripts = [_script(ch) for ch in name]
    kinds = [unicodedata.category(ch) for ch in name]
    if not any(kind == "Nd" or (kind[0] == "L" and script not in _NEUTRAL_SCRIPTS)
               for kind, script in zip(kinds, scripts)):
        raise ValidationError("username", "must contain a letter or a digit")
    zeros = sorted({ord(ch) - unicodedata.decimal(ch) for ch, kind in zip(name, kinds) if kind == "Nd"})
    if len(zeros) > 1:
        ranges = " and ".join(f"{chr(zero)}-{chr(zero + 9)}" for zero in zeros)
        raise ValidationError("username", f"mixes kinds of digits ({ranges}): use one kind")
    letter_scripts = {script for script, kind in zip(scripts, kinds) if kind != "Nd"} - _NEUTRAL_SCRIPTS
    if not _one_writing_system(letter_scripts):
        raise ValidationError("username", f"mixes scripts ({_script_names(letter_scripts)}): "
                                          "use the letters of one script only")
    digit_scripts = {_script(chr(zero)) for zero in zeros} - _NEUTRAL_SCRIPTS
    if not _one_writing_system(letter_scripts | digit_scripts):
        mix = f"{_script_names(digit_scripts)} digits among {_script_names(letter_scripts)} letters"
        raise ValidationError("username", f"has {mix}: use 0-9 or digits of the letters' script")


def _refuse_stray_marks(name: str) -> None:
    """A combining mark must sit on a letter (or on marks that do): at the start, or on a digit or
    a '.', it draws over nothing of its own, and a name of marks alone looks like no name."""
    on_letter = False
    for ch in name:
        kind = unicodedata.category(ch)
        if kind[0] == "M":
            if not on_letter:
                raise ValidationError("username", f"has a combining mark ({_name(ch)}) that does not follow a letter")
        else:
            on_letter = kind[0] == "L"


def _script(ch: str) -> str:
    """The Unicode Script property, from confusable_homoglyphs' copy of Scripts.txt ('LATIN', 'COMMON')."""
    return categories.alias(ch)


def _one_writing_system(scripts: set[str]) -> bool:
    return len(scripts) <= 1 or any(scripts <= mix for mix in _SCRIPT_MIXES)


def _script_names(scripts: set[str]) -> str:
    return " and ".join(sorted(script.replace("_", " ").title() for script in scripts))


@functools.cache
def _prototypes() -> dict[str, str]:
    """Each confusable character's prototype, from the confusables table of confusable_homoglyphs.

    That package keeps Unicode's confusables.txt as pairs listed both ways round, without saying
    which side is the prototype, and with U+200E marks around right-to-left text (taken from the
    file's comments); they are removed. In the data each prototype and the characters mapped to it
    form a star, so the prototype is the member with several neighbours, or the one of several
    characters ('rn' for 'm'). When a pair stands alone either side may serve: both then map to one
    character, which is all that comparing skeletons needs.
    """
    neighbours: defaultdict[str, set[str]] = defaultdict(set)
    for source, entries in confusables.confusables_data.items():
        a = source.replace("\u200e", "")
        for entry in entries:
            b = entry["c"].replace("\u200e", "")
            if a and b and a != b:
                neighbours[a].add(b)
                neighbours[b].add(a)
    in_sequences = {ch for node in neighbours if len(node) > 1 for ch in node}
    prototypes: dict[str, str] = {}
    seen: set[str] = set()
    for start in sorted(neighbours):
        if start in seen:
            continue
        group, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node not in group:
                group.add(node)
                stack.extend(neighbours[node] - group)
        seen |= group
        prototype = max(sorted(group), key=lambda n: (len(neighbours[n]), len(n) > 1, n in in_sequences))
        prototypes.update((node, prototype) for node in group if len(node) == 1 and node != prototype)
    return prototypes


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
