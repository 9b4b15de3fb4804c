"""Exports: a user's own data, and an admin's PEFT export of a user's adapter, as zips."""

import json

import pytest

from app.errors import AccessDenied, AppError
from tests.app.helpers import chat, exported, run_jobs

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def test_export_holds_history_and_a_peft_adapter(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "hello")
    chat(services, uid, "again")
    run_jobs(services)
    with exported(services, services.exports.my_data(uid).download) as z:
        names = set(z.namelist())
        history = json.loads(z.read("history.json"))
        snapshot = json.loads(z.read("adapter/snapshot.json"))
    assert {"history.json", "adapter/state.safetensors", "adapter/snapshot.json"} | {
        f"adapter/peft/{name}" for name in PEFT_FILES} == names
    assert history["user"] == "alice"
    assert [m["text"] for m in history["messages"] if m["role"] == "user"] == ["hello", "again"]
    assert all(m["absorbed"] for m in history["messages"]) and snapshot["version"] == 1
    assert services.storage.list_audit()[0].action == "export"


def test_an_export_holds_only_its_owner_s_data(services, password):
    alice, bob = services.accounts.sign_up("alice", password).account.id, services.accounts.sign_up("bob", password).account.id
    chat(services, alice, "Alice's secret")
    chat(services, alice, "more")
    run_jobs(services)
    with exported(services, services.exports.my_data(bob).download) as z:
        assert "Alice" not in z.read("history.json").decode()
        assert z.namelist() == ["history.json"]  # no adapter yet
    with pytest.raises(AccessDenied):
        services.exports.my_data(None)


def test_an_export_made_while_the_adapter_is_rebuilt_says_it_is_not_in_it(services, password):
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "My cat is called Tobrik.")
    chat(services, uid, "again")
    run_jobs(services)
    assert services.exports.my_data(uid).adapter_version == 1
    first = next(m for m in services.chat.history(uid) if m.role == "user")
    services.memory.forget(uid, first.id)  # a rebuild is pending: the adapter may hold the forgotten turn
    made = services.exports.my_data(uid)
    assert (made.adapter_version, made.rebuilding) == (None, True)
    with exported(services, made.download) as z:
        assert z.namelist() == ["history.json"]
    from app.ui import _export_html

    assert "being rebuilt" in _export_html(made)
    run_jobs(services)
    assert "being rebuilt" not in _export_html(services.exports.my_data(uid))


def test_an_admin_exports_a_user_s_adapter_as_a_peft_lora(services, password):
    admin = services.accounts.ensure_admin("root", password).id
    uid = services.accounts.sign_up("alice", password).account.id
    with pytest.raises(AppError, match="alice has no usable adapter yet"):
        services.admin.export_peft(admin, uid)
    chat(services, uid, "hello")
    chat(services, uid, "again")
    run_jobs(services)
    download = services.admin.export_peft(admin, uid)
    assert download.filename == "adapter-alice-peft.zip"
    with exported(services, download) as z:
        assert set(z.namelist()) == PEFT_FILES
    entry = services.storage.list_audit()[0]
    assert (entry.action, entry.actor_id, entry.target_user_id) == ("export_peft", admin, uid)
    services.accounts.log_out(uid)  # the admin's copy holds alice's data: it goes with her links
    assert services.downloads.find(download.token, None, services.accounts.exists) is None
