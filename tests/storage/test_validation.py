"""Bad input is refused with a clear error naming the field, and leaves the database unchanged."""

import sys
import unicodedata

import pytest
from sqlalchemy import insert, select

from storage import StorageSettings, UsernameLookAlike, UsernameTaken, ValidationError, validation
from storage.models import USERNAME_SKELETON_CHARS, User
from storage.settings import USERNAME_COLUMN_CHARS
from tests.storage.helpers import FAST, PASSWORD, files_under, table_counts

SETTINGS = StorageSettings()

BAD_USERNAMES = [
    ("", "is empty"),
    ("a" * (SETTINGS.username_max_chars + 1), "longer than"),
    ("x" * 10_000_000, "longer than"),
    ("ali\x00ce", "NUL"),
    ("ali\ud800ce", "lone surrogate"),
    ("ali\nce", "control character"),
    ("ali\x1bce", "control character"),
    ("ali ce", "space"),
    ("alice\u200b", "invisible"),  # zero-width space
    ("ali\u202ece", "invisible"),  # right-to-left override
    ("ali@ce", "only letters"),
    ("ali😀ce", "only letters"),
    (None, "must be text"),
    (b"alice", "must be text"),
    # look-alikes (issue: names that pass for another account)
    ("p\u0430ypal", "mixes scripts"),  # Cyrillic a among Latin letters
    ("\u0440\u0430\u0443pal", "mixes scripts"),
    ("\u03b1lice", "mixes scripts"),  # Greek alpha
    ("\u5c71\u7530abc", "mixes scripts"),  # Han with Latin
    ("\u30ab\ud55c", "mixes scripts"),  # Katakana with Hangul
    ("...", "letter or a digit"),
    ("-_-", "letter or a digit"),
    ("._.", "letter or a digit"),
    ("\u30fc\u30fc", "letter or a digit"),  # prolonged sound marks: no script of their own
    ("\u0301", "combining mark"),
    ("\u0301\u0302\u0303", "combining mark"),
    ("\u0301alice", "combining mark"),
    ("ali.\u0301ce", "combining mark"),
    ("alice7\u0301", "combining mark"),
    ("alice1\u0967", "kinds of digits"),  # ASCII 1 and Devanagari 1
    ("\u0930\u093e\u092e\u0967\u09e8", "kinds of digits"),  # Devanagari and Bengali digits
    ("alice\u0661", "Arabic digits among Latin letters"),
]

BAD_MESSAGES = [
    ("", "is empty"),
    (" \n\t ", "is empty"),
    ("\u200b\u200c\u200d\u2060\ufeff", "no visible character"),  # zero-width space, joiners, word joiner, BOM
    ("\u3164 \u2800\u115f", "no visible character"),  # Hangul filler, blank Braille, choseong filler
    ("\u202e\u2066\u0301", "no visible character"),  # bidi controls and a lone combining mark
    ("x" * (10 * 1024 * 1024), "longer than"),
    ("hi\x00there", "NUL"),
    ("hi\ud800there", "lone surrogate"),
    ("bell\x07", "control character"),
    ("esc\x1b[31m", "control character"),
    ("del\x7f", "control character"),
    ("c1\x85", "control character"),
    (42, "must be text"),
]

BAD_PASSWORDS = [
    ("", "is empty"),
    ("short", "shorter than"),
    ("p" * (SETTINGS.password_max_chars + 1), "longer than"),
    ("password\x00password", "NUL"),
    ("password\udfffpassword", "lone surrogate"),
    (None, "must be text"),
]


BAD_TEXT = ([(validation.username, "username", value, reason) for value, reason in BAD_USERNAMES]
            + [(validation.message_text, "text", value, reason) for value, reason in BAD_MESSAGES]
            + [(validation.password, "password", value, reason) for value, reason in BAD_PASSWORDS])


@pytest.mark.parametrize("check,field,value,reason", BAD_TEXT)
def test_bad_text_is_refused_naming_the_field(check, field, value, reason):
    with pytest.raises(ValidationError, match=reason) as e:
        check(value, SETTINGS)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("variant", ["Alice", "ALICE", "Ａｌｉｃｅ", "alice"])
def test_usernames_are_nfkc_casefolded(variant):
    assert validation.username(variant, SETTINGS) == "alice"


def test_usernames_in_other_scripts_are_welcome():
    assert validation.username("Zoë_O-Brien.2", SETTINGS) == "zoë_o-brien.2"
    assert validation.username("STRASSE", SETTINGS) == validation.username("straße", SETTINGS) == "strasse"
    assert validation.username("Дмитрий", SETTINGS) == "дмитрий"


@pytest.mark.parametrize("name", [
    "\u5c71\u7530\u305f\u308d\u3046",  # Han + Hiragana (Japanese)
    "\u30e4\u30de\u30c0\u305f\u308d\u3046",  # Katakana + Hiragana
    "\u6f22\u5b57\u30ab\u30bf\u30ab\u30ca",  # Han + Katakana
    "\uae40\ucca0\uc218", "\u91d1\uae40",  # Hangul, Han + Hangul (Korean)
    "\u738b\u3105\u3106",  # Han + Bopomofo (Chinese)
    "\u0939\u093f\u0928\u094d\u0926\u0940",  # Devanagari: vowel signs and virama follow letters
    "\u0930\u093e\u092e\u0967\u0968",  # Devanagari letters with Devanagari digits
    "\u0645\u062d\u0645\u062f\u0663",  # Arabic letters with an Arabic-Indic digit
    "\u03b5\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac", "user_2", "12345", "r2-d2.", "a\u0301\u0302\u0323",
])
def test_one_script_names_are_welcome(name):
    assert validation.username(name, SETTINGS) == unicodedata.normalize("NFKC", name).casefold()


@pytest.mark.parametrize("variant", ["ALICE", "\uff21\uff2c\uff29\uff23\uff25", "Alice", "alice"])
def test_normalize_username_is_the_name_key_without_checks(variant):
    assert validation.normalize_username(variant) == "alice"
    assert validation.normalize_username("p\u0430ypal") == "p\u0430ypal"  # no checks: look-alikes stay apart
    assert validation.normalize_username("Stra\u00dfe") == validation.normalize_username("STRASSE")


@pytest.mark.parametrize("text", ["", "\x00", "\ud800", "\udfff\ud800", "\u0301" * 50, "\ufdfa" * 1000,
                                  "x" * 10_000_000, "\U0010ffff", " \n\t", "\u202e"])
def test_normalize_username_never_raises_and_stays_short(text):
    normalized = validation.normalize_username(text)
    assert isinstance(normalized, str)
    normalized.encode("utf-8")  # storable and loggable: a lone surrogate became U+FFFD
    assert len(normalized) <= 18 * validation.NORMALIZE_MAX_CHARS  # NFKC expands U+FDFA to 18 characters
    assert isinstance(validation.username_skeleton(text), str)


@pytest.mark.parametrize("name,look_alike", [
    ("paypal", "\u0440\u0430\u0443\u0440\u0430l"),  # Cyrillic but the final l
    ("paypa", "\u0440\u0430\u0443\u0440\u0430"),  # all Cyrillic
    ("scope", "\u0455\u0441\u043e\u0440\u0435"),  # all Cyrillic
    ("modern", "rnodern"),  # the confusables data says 'rn' looks like 'm'
    ("paypal", "paypa1"),
    ("alice", "\u0251lice"),  # Latin alpha
    ("admin", "admin."), ("admin", "_admin"), ("ad-min", "admin"),  # punctuation is easy to miss
    ("ilvara", "ilvar\u0227"), ("ilvara", "ilvar\u1ea1"),  # so is a faint dot above or below
])
def test_look_alikes_share_a_skeleton(name, look_alike):
    assert validation.username_skeleton(name) == validation.username_skeleton(look_alike)
    assert validation.normalize_username(name) != validation.normalize_username(look_alike)


def test_different_names_keep_different_skeletons():
    names = ["alice", "bob", "alicia", "zo\u00eb", "zoe", "nguy\u1ec5n", "nguyen", "l\u00ea", "le",
             "\u0938\u0941\u0928\u0940\u0932", "\u0938\u0928\u0940\u0932",  # Hindi with and without a vowel sign
             "\u0e22\u0e34\u0e19\u0e14\u0e35", "\u0e22\u0e19\u0e14",  # Thai likewise
             "\u0434\u043c\u0438\u0442\u0440\u0438\u0439", "\u5c71\u7530"]
    assert len({validation.username_skeleton(name) for name in names}) == len(names)


def test_a_skeleton_is_its_own_skeleton():
    for name in ["paypal", "rnodern", "\u0440\u0430\u0443\u0440\u0430l", "\u0272", "\uab51", "\u048b"]:
        skeleton = validation.username_skeleton(name)
        assert validation.username_skeleton(skeleton) == skeleton


def test_the_skeleton_column_holds_the_longest_name():
    """No character a username may hold spells out to more than the column allows per character."""
    widest = 0
    for code_point in range(sys.maxunicode + 1):
        ch = chr(code_point)
        if unicodedata.category(ch)[0] not in "LMN":
            continue
        normalized = validation.normalize_username(ch)
        widest = max(widest, -(-len(validation.username_skeleton(ch)) // len(normalized)))
    assert widest * USERNAME_COLUMN_CHARS <= USERNAME_SKELETON_CHARS


def test_messages_keep_newlines_and_tabs_and_get_lf_line_ends():
    assert validation.message_text("a\tb\nc", SETTINGS) == "a\tb\nc"
    assert validation.message_text("a\r\nb\rc", SETTINGS) == "a\nb\nc"
    assert validation.message_text("  émoji 😀 and 中文  ", SETTINGS) == "  émoji 😀 and 中文  "


@pytest.mark.parametrize("value,reason", [(-1, "between"), (2**31, "between"), (True, "integer"),
                                          ("3", "integer"), (1.0, "integer")])
def test_bad_counts(value, reason):
    with pytest.raises(ValidationError, match=reason):
        validation.count("token_count", value)


@pytest.mark.parametrize("value,reason", [([], "must be a dict"), ({"x": float("nan")}, "not storable"),
                                          ({"x": object()}, "not storable"), ({"x": "\ud800"}, "not storable"),
                                          ({"x": "y" * 70_000}, "larger than")])
def test_bad_json(value, reason):
    with pytest.raises(ValidationError, match=reason):
        validation.json_document("stats", value, SETTINGS)


def test_settings_refuse_limits_the_schema_cannot_hold():
    with pytest.raises(ValueError, match="username_max_chars"):
        StorageSettings(username_max_chars=65)
    with pytest.raises(ValueError, match="password_min_chars"):
        StorageSettings(password_min_chars=0)


# --- through the repository, on both backends: a refusal writes nothing -------------------------

@pytest.fixture
def unchanged(storage, data_dir):
    """Asserts, after the test, that no row and no file was added or removed."""
    before = table_counts(storage), files_under(data_dir)
    yield
    assert (table_counts(storage), files_under(data_dir)) == before


@pytest.fixture
def chat(storage, alice):
    conversation = storage.start_conversation(alice.id)
    storage.append_message(alice.id, conversation.id, "user", "hello", 1)
    return alice, conversation


@pytest.mark.parametrize("name,reason", BAD_USERNAMES)
def test_create_user_refuses_bad_usernames(storage, unchanged, name, reason):
    with pytest.raises(ValidationError, match=reason):
        storage.create_user(name, PASSWORD)


@pytest.mark.parametrize("secret,reason", BAD_PASSWORDS)
def test_create_user_refuses_bad_passwords(storage, unchanged, secret, reason):
    with pytest.raises(ValidationError, match=reason):
        storage.create_user("alice", secret)


@pytest.mark.parametrize("variant", ["alice", "Alice", "ALICE", "Ａｌｉｃｅ"])
def test_duplicate_usernames_are_refused(storage, alice, unchanged, variant):
    with pytest.raises(UsernameTaken, match="'alice' is already taken") as e:
        storage.create_user(variant, PASSWORD)
    assert e.value.field == "username"


@pytest.mark.parametrize("name,look_alike", [
    ("paypa", "\u0440\u0430\u0443\u0440\u0430"), ("scope", "\u0405\u0421\u041e\u0420\u0415"),  # all Cyrillic
    ("paypal", "PAYPA1"), ("modern", "rnodern"), ("rnodern", "Modern"), ("admin", "admin."),
    ("admin", "_Admin"),
])
def test_look_alikes_of_an_existing_account_are_refused(storage, data_dir, name, look_alike):
    first = storage.create_user(name, PASSWORD)
    before = table_counts(storage), files_under(data_dir)
    with pytest.raises(UsernameLookAlike, match="looks too much like an existing account") as e:
        storage.create_user(look_alike, PASSWORD)
    assert isinstance(e.value, UsernameTaken) and e.value.field == "username"
    assert (table_counts(storage), files_under(data_dir)) == before
    assert storage.authenticate(look_alike, PASSWORD) is None
    assert storage.authenticate(name, PASSWORD).id == first.id


def test_the_skeleton_is_stored_with_the_user(storage):
    user = storage.create_user("Modern", PASSWORD)
    assert user.username_skeleton == validation.username_skeleton("modern") == "rnodern"
    assert storage.get_user(user.id).username_skeleton == "rnodern"


def test_an_older_account_with_a_name_now_refused_can_still_log_in(storage):
    """Accounts made before the look-alike rules keep working: the rules apply to new names only."""
    legacy = "p\u0430ypal"  # mixed scripts, accepted before
    with storage.engine.begin() as connection:
        connection.execute(insert(User).values(username=legacy, username_skeleton=validation.username_skeleton(legacy),
                                               password_hash=storage._hasher.hash(PASSWORD)))
        user_id = connection.scalar(select(User.id).where(User.username == legacy))
    assert storage.find_user(legacy.upper()).id == user_id
    assert storage.authenticate(legacy, PASSWORD).id == user_id
    with pytest.raises(UsernameTaken):
        storage.create_user("paypal", PASSWORD)


@pytest.mark.parametrize("text,reason", BAD_MESSAGES)
def test_append_message_refuses_bad_text(storage, chat, unchanged, text, reason):
    user, conversation = chat
    with pytest.raises(ValidationError, match=reason):
        storage.append_message(user.id, conversation.id, "user", text, 1)


@pytest.mark.parametrize("role,tokens,reason", [("system", 1, "role"), ("User", 1, "role"), (None, 1, "role"),
                                                 ("user", -1, "token_count"), ("user", "1", "token_count")])
def test_append_message_refuses_bad_role_or_token_count(storage, chat, unchanged, role, tokens, reason):
    user, conversation = chat
    with pytest.raises(ValidationError, match=reason):
        storage.append_message(user.id, conversation.id, role, "fine text", tokens)


def test_stored_text_comes_back_exactly(storage, chat):
    user, conversation = chat
    text = "tabs\tand\nnewlines, 😀, 中文, ‮ bidi, e\u0301 combining, " + "long " * 6000
    stored = storage.append_message(user.id, conversation.id, "assistant", text, 7)
    assert storage.history(user.id)[-1].text == text == stored.text


@pytest.mark.parametrize("kwargs,reason", [
    (dict(data=b""), "data: is empty"),
    (dict(data="text"), "data: must be bytes"),
    (dict(data=b"x" * (FAST.snapshot_max_bytes + 1)), "data: is larger"),
    (dict(generator_id=""), "generator_id: is empty"),
    (dict(generator_id="g\x00"), "generator_id: contains a NUL"),
    (dict(base_model_id="m" * 201), "base_model_id: is longer"),
    (dict(cursor=-1), "cursor: must be between"),
    (dict(tokens_absorbed=True), "tokens_absorbed: must be an integer"),
    (dict(stats={"loss": float("inf")}), "stats: is not storable"),
])
def test_commit_snapshot_refuses_bad_input(storage, chat, unchanged, kwargs, reason):
    user, _ = chat
    message = storage.history(user.id)[-1]
    arguments = dict(data=b"state", generator_id="g", base_model_id="m", cursor=message.id, tokens_absorbed=1)
    with pytest.raises(ValidationError, match=reason):
        storage.commit_snapshot(user.id, **(arguments | kwargs))


def test_audit_entries_refuse_bad_input(storage, alice, unchanged):
    with pytest.raises(ValidationError, match="action: contains a control"):
        storage.record_audit(alice.id, "reset\x1b")
    with pytest.raises(ValidationError, match="details: is not storable"):
        storage.record_audit(alice.id, "reset", details={"x": {1, 2}})


def test_bad_titles_are_refused(storage, alice, unchanged):
    with pytest.raises(ValidationError, match="title: contains a control"):
        storage.start_conversation(alice.id, "tab\x07")
    with pytest.raises(ValidationError, match="title: is longer"):
        storage.start_conversation(alice.id, "t" * 201)


def test_the_password_may_not_be_the_username(storage):
    for name, secret in (("samepass", "samepass"), ("SamePass", "samepass"), ("longname1", "LONGNAME1")):
        with pytest.raises(ValidationError, match="password: must not be the username"):
            storage.create_user(name, secret)
