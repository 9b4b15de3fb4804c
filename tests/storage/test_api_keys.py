"""API keys in storage, on SQLite and PostgreSQL: made, found, listed, revoked, gone with their user."""

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from storage import NotFound, ValidationError
from storage.models import ApiKey
from storage.repository import API_KEY_PREFIX, is_api_key
from tests.storage.helpers import table_counts, transactions


def _stored(storage) -> list[tuple]:
    """Every stored column of every key, as the database holds them."""
    with storage.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(select(ApiKey.__table__))]


def test_a_key_is_shown_once_and_only_its_hash_is_stored(storage, alice):
    made = storage.create_api_key(alice.id, "  my laptop  ")
    assert made.secret.startswith(API_KEY_PREFIX) and is_api_key(made.secret) and len(made.secret) == 49
    assert made.key.name == "my laptop" and made.key.user_id == alice.id and made.key.last_used_at is None
    assert made.key.hint == made.secret[:8] + "…" + made.secret[-4:]
    assert made.key.key_hash == hashlib.sha256(made.secret.encode()).hexdigest()
    stored = _stored(storage)
    assert len(stored) == 1 and not any(made.secret in str(value) for value in stored)
    assert storage.list_audit(target_user_id=alice.id)[0].action == "create_api_key"
    assert storage.create_api_key(alice.id).secret != made.secret  # random, not derived from anything


def test_a_key_finds_its_user_and_records_its_use_once_a_minute(storage, alice, bob):
    key = storage.create_api_key(alice.id).secret
    storage.create_api_key(bob.id)
    with transactions(storage) as first:
        holder = storage.find_api_key(key)
    assert holder.user.id == alice.id and holder.user.username == "alice" and holder.key.last_used_at is not None
    assert len(first) == 2  # the read, and the first use recorded
    with transactions(storage) as again:
        assert storage.find_api_key(key).key.last_used_at == holder.key.last_used_at
    assert len(again) == 1  # used a moment ago: nothing written
    with storage.engine.begin() as connection:  # as if a minute had passed
        connection.execute(update(ApiKey).values(last_used_at=holder.key.last_used_at - timedelta(minutes=2)))
    with transactions(storage) as later:
        assert storage.find_api_key(key).key.last_used_at >= holder.key.last_used_at
    assert len(later) == 2


@pytest.mark.parametrize("wrong", [None, "", "sk-mc-", "Bearer x", 42, "sk-mc-" + "a" * 42, "sk-mc-" + "a" * 44,
                                   "sk-mc-" + "é" * 43, "sk-mc-" + "a" * 42 + "\n"])
def test_anything_but_a_live_key_finds_nobody_without_a_lookup(storage, alice, wrong):
    storage.create_api_key(alice.id)
    with transactions(storage) as begun:
        assert storage.find_api_key(wrong) is None
    assert begun == []


def test_an_unknown_key_of_the_right_form_finds_nobody(storage, alice):
    key = storage.create_api_key(alice.id).secret
    assert storage.find_api_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None


def test_keys_are_listed_and_revoked_by_their_owner_only(storage, alice, bob):
    first, second = storage.create_api_key(alice.id, "one"), storage.create_api_key(alice.id, "two")
    bobs = storage.create_api_key(bob.id, "bob's")
    assert [k.name for k in storage.list_api_keys(alice.id)] == ["one", "two"]
    assert [k.name for k in storage.list_api_keys(bob.id)] == ["bob's"]
    before = table_counts(storage)
    with pytest.raises(NotFound):
        storage.delete_api_key(bob.id, first.key.id)  # alice's key, asked for as bob's
    assert table_counts(storage) == before and storage.find_api_key(first.secret).user.id == alice.id
    revoked = storage.delete_api_key(alice.id, first.key.id, actor_id=alice.id)
    assert revoked.id == first.key.id and storage.find_api_key(first.secret) is None
    assert [k.name for k in storage.list_api_keys(alice.id)] == ["two"]
    assert storage.find_api_key(second.secret).user.id == alice.id and storage.find_api_key(bobs.secret) is not None
    entry = storage.list_audit(target_user_id=alice.id)[0]
    assert (entry.action, entry.actor_id, entry.details["key_id"]) == ("revoke_api_key", alice.id, first.key.id)
    with pytest.raises(NotFound):
        storage.delete_api_key(alice.id, first.key.id)  # once only


def test_a_deleted_users_keys_die_with_the_account(storage, alice, bob):
    key = storage.create_api_key(alice.id).secret
    bobs = storage.create_api_key(bob.id).secret
    storage.delete_user(alice.id)
    assert storage.find_api_key(key) is None and storage.find_api_key(bobs).user.id == bob.id
    assert [row[1] for row in _stored(storage)] == [bob.id]


def test_key_names_and_numbers_are_checked(storage, alice):
    assert storage.create_api_key(alice.id, "   ").key.name is None
    for name, reason in (("x" * 65, "longer than 64"), ("tab\there", "control character"), (b"bytes", "text")):
        with pytest.raises(ValidationError, match=reason):
            storage.create_api_key(alice.id, name)
    with pytest.raises(NotFound):
        storage.create_api_key(999_999)


def test_one_account_holds_a_bounded_number_of_keys(storage, alice, bob, monkeypatch):
    monkeypatch.setattr(storage, "settings", storage.settings.__class__(api_keys_per_user=2))
    storage.create_api_key(alice.id)
    kept = storage.create_api_key(alice.id)
    with pytest.raises(ValidationError, match="2 keys is the most"):
        storage.create_api_key(alice.id)
    storage.create_api_key(bob.id)  # counted per account
    storage.delete_api_key(alice.id, kept.key.id)
    storage.create_api_key(alice.id)
    assert len(storage.list_api_keys(alice.id)) == 2
