"""The admin page's side: every action for admins only, what it shows, the probe, the actions."""

import pytest

from app.admin import LayerSummary
from app.errors import AccessDenied, AppError, InvalidInput
from tests.app.helpers import chat, run_jobs


@pytest.mark.parametrize("call", [
    lambda s, a, t: s.admin.users(a), lambda s, a, t: s.admin.user(a, t), lambda s, a, t: s.admin.audit(a),
    lambda s, a, t: s.admin.username(a, t),
    lambda s, a, t: s.admin.adapter_summary(a, t), lambda s, a, t: s.admin.probe(a, t, "hi"),
    lambda s, a, t: s.admin.rebuild(a, t), lambda s, a, t: s.admin.reset(a, t),
    lambda s, a, t: s.admin.export_peft(a, t), lambda s, a, t: s.admin.delete_user(a, t),
    lambda s, a, t: s.admin.set_signup(a, False),
])
def test_every_admin_action_refuses_non_admins_and_anonymous_users(services, password, call):
    target = services.accounts.sign_up("alice", password).account.id
    mallory = services.accounts.sign_up("mallory", password).account.id
    for actor in (mallory, None, 99999, "abc"):
        with pytest.raises(AccessDenied):
            call(services, actor, target)
    assert services.storage.get_user(target).username == "alice"


def test_admin_pages_and_actions(services, password):
    admin = services.accounts.ensure_admin("root", password).id
    uid = services.accounts.sign_up("alice", password).account.id
    chat(services, uid, "My cat is called Tobrik.")
    chat(services, uid, "ok")
    run_jobs(services)
    rows = {u.username: u for u in services.admin.users(admin)}
    assert set(rows) == {"root", "alice"} and rows["root"].admin
    assert (rows["alice"].messages, rows["alice"].adapter_version, rows["alice"].needs_rebuild) == (4, 1, False)
    detail = services.admin.user(admin, uid)
    assert detail.username == "alice" and detail.status.absorbed_messages == 4
    (snapshot,) = detail.snapshots
    assert (snapshot.version, snapshot.messages, snapshot.rebuild, len(snapshot.sha256)) == (1, 4, None, 12)
    summary = services.admin.adapter_summary(admin, uid)
    assert len(summary) == len(services.engine.adapted) and isinstance(summary[0], LayerSummary)
    assert summary[0].singular_values[0] == 1.0
    assert services.admin.rebuild(admin, uid) == "alice"
    assert services.admin.adapter_summary(admin, uid) is None  # nothing usable until it is rebuilt
    run_jobs(services)
    assert services.admin.user(admin, uid).snapshots[-1].rebuild is True
    assert services.admin.reset(admin, uid) == "alice"
    assert services.memory.status(uid).messages == 0 and services.storage.latest_snapshot(uid) is None
    assert services.admin.delete_user(admin, uid) == "alice"
    audit = services.admin.audit(admin)
    assert [e.action for e in audit[:3]] == ["delete_user", "reset_memory", "rebuild_adapter"]
    # alice's account is gone since; the rows still say whom they were about (attacker findings 11)
    assert audit[2].actor == "root" and audit[2].user == "alice" and audit[0].user == "alice"
    with pytest.raises(AccessDenied):
        services.chat.history(uid)


def test_the_probe_answers_three_ways_on_the_inference_loop(services, password):
    admin = services.accounts.ensure_admin("root", password).id
    uid = services.accounts.sign_up("alice", password).account.id
    probe = services.admin.probe(admin, uid, "What is my cat called?")
    assert [a.name for a in probe.answers] == ["base model", "adapter", "full history"]
    assert probe.answers[1].text.startswith("(no adapter yet)")
    chat(services, uid, "My cat is called Tobrik.")
    chat(services, uid, "ok")
    run_jobs(services)
    probe = services.admin.probe(admin, uid, "  What is my cat called?  ")
    base, adapter, full = probe.answers
    assert full.prompt_tokens > adapter.prompt_tokens == base.prompt_tokens
    assert not adapter.text.startswith("(no adapter yet)") and probe.seconds > 0
    again = services.admin.probe(admin, uid, "What is my cat called?")
    assert [a.text for a in again.answers] == [a.text for a in probe.answers]  # greedy: the same answers
    entry = services.storage.list_audit()[0]
    assert (entry.action, entry.details) == ("probe", {"question": "What is my cat called?"})
    for question, words in [("   ", "The question is empty"), (42, "The question must be text")]:
        with pytest.raises(InvalidInput, match=words):
            services.admin.probe(admin, uid, question)


def test_admin_actions_on_a_missing_or_malformed_user_are_refusals(services, password):
    admin = services.accounts.ensure_admin("root", password).id
    for target in (99999, "abc", None):
        with pytest.raises(AppError):
            services.admin.user(admin, target)
        with pytest.raises(AppError):
            services.admin.username(admin, target)
    assert services.admin.username(admin, admin) == "root"
    with pytest.raises(AppError, match="own account"):
        services.admin.delete_user(admin, admin)
