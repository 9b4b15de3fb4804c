"""Bad input is refused with a clear error naming the field, and leaves the database unchanged."""

import pytest

from storage import StorageSettings, UsernameTaken, ValidationError, validation
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
]

BAD_MESSAGES = [
    ("", "is empty"),
    (" \n\t ", "is empty"),
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
