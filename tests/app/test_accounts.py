"""Accounts: sign-up, log in, their rate limits and audit, and the sign-up switch."""

import pytest

from app.errors import AccessDenied, InvalidInput, LoginFailed, RateLimited, describe


def test_sign_up_log_in_and_wrong_password(services, password):
    signed_up = services.accounts.sign_up("alice", password)
    alice = signed_up.account
    assert (alice.username, alice.is_admin) == ("alice", False)
    logged_in = services.accounts.log_in("Alice", password)  # usernames are case-folded
    assert logged_in.account == alice and logged_in.secret != signed_up.secret  # a login of its own
    assert services.accounts.whoami(logged_in.secret) == alice
    with pytest.raises(LoginFailed):
        services.accounts.log_in("alice", "wrong password!")
    with pytest.raises(LoginFailed):
        services.accounts.log_in("nobody", password)
    for nobody in (None, "abc", 99999, True, 1.0, str(alice.id)):
        with pytest.raises(AccessDenied, match="Please log in"):
            services.accounts.whoami(nobody)


def test_a_deleted_accounts_page_never_becomes_the_next_account(services, password):
    """Attacker findings, point 1: an open page kept only a user id, and SQLite gave the next
    sign-up that id; the old page then read and wrote the new user's chat, memory and keys."""
    old = services.accounts.sign_up("alice", password)
    services.accounts.delete_own(old.secret)
    new = services.accounts.sign_up("bob", password)
    assert new.account.id != old.account.id
    for action in (services.accounts.whoami, services.chat.history, services.memory.status,
                   services.api_keys.mine, lambda who: services.api_keys.create(who, "stolen")):
        with pytest.raises(AccessDenied, match="Please log in"):
            action(old.secret)
    assert services.api_keys.mine(new.secret) == ()


def test_logging_out_ends_this_login_and_everywhere_ends_all(services, password):
    home, work = services.accounts.sign_up("alice", password), services.accounts.log_in("alice", password)
    bob = services.accounts.sign_up("bob", password)
    assert services.accounts.log_out(home.secret) == 1
    with pytest.raises(AccessDenied):
        services.accounts.whoami(home.secret)
    assert services.accounts.whoami(work.secret).username == "alice"  # another browser stays in
    assert services.accounts.log_out(home.secret) == 0  # a second logout of the same page: nothing to end
    again = services.accounts.log_in("alice", password)
    assert services.accounts.log_out(again.secret, everywhere=True) == 2
    with pytest.raises(AccessDenied):
        services.accounts.whoami(work.secret)
    assert services.accounts.whoami(bob.secret).username == "bob"


def test_a_refused_sign_up_says_which_field_and_why_in_words_for_people(services, password):
    services.accounts.sign_up("alice", password)
    for name, secret, field, words in [("alice", password, "username", "The username 'alice' is already taken."),
                                       ("bob", "short", "password", "The password is shorter than"),
                                       ("a\x00b", password, "username", "The username contains a NUL")]:
        with pytest.raises(InvalidInput) as refused:
            services.accounts.sign_up(name, secret)
        assert refused.value.field == field and describe(refused.value, "sign up").startswith(words)


def test_sign_up_can_be_closed_by_an_admin(services, password):
    admin = services.accounts.ensure_admin("root", password)
    assert admin.is_admin and services.accounts.ensure_admin("root", password) == admin
    user = services.accounts.sign_up("alice", password).account.id
    with pytest.raises(AccessDenied, match="Admins only"):
        services.admin.set_signup(user, False)
    services.admin.set_signup(admin.id, False)
    with pytest.raises(AccessDenied, match="Sign-up is closed"):
        services.accounts.sign_up("bob", password)
    assert services.admin.audit(admin.id)[0].action == "set_signup"


def test_failed_logins_are_throttled_per_normalised_name_and_address_without_waiting(services, password,
                                                                                   monkeypatch):
    services.settings.login_failures_per_name = "3/15 minutes"
    services.accounts.sign_up("alice", password)
    monkeypatch.setattr("time.sleep", lambda s: pytest.fail("a login handler must not sleep"))
    for spelling in ("alice", "ALICE", "ａｌｉｃｅ"):  # look-alike spellings of one stored name share a count
        with pytest.raises(LoginFailed):
            services.accounts.log_in(spelling, "wrong password", "10.0.0.1")
    checked = []
    monkeypatch.setattr(services.storage, "authenticate", lambda *a: checked.append(a))
    with pytest.raises(RateLimited, match="Too many failed logins for this account"):
        services.accounts.log_in("Alice", password, "10.0.0.1")
    assert checked == []  # refused before any password is checked
    monkeypatch.undo()
    assert services.accounts.log_in("alice", password, "10.0.0.2").account.username == "alice"  # the owner still gets in
    audit = services.storage.list_audit()
    failed = [e for e in audit if e.action == "login_failed"]
    assert len(failed) == 3 and failed[0].details == {"username": "alice", "address": "10.0.0.1"}
    assert failed[0].target_user_id == services.storage.find_user("alice").id


def test_many_names_from_one_address_are_throttled_too(services, password):
    services.settings.login_failures_per_address = "4/15 minutes"
    for i in range(4):
        with pytest.raises(LoginFailed):
            services.accounts.log_in(f"user{i}", "wrong password", "10.0.0.9")
    with pytest.raises(RateLimited, match="from this address"):
        services.accounts.log_in("someone-else", "wrong password", "10.0.0.9")


def test_sign_ups_are_limited_and_audited(services, password):
    services.settings.signups_per_address = "2/hour"
    services.accounts.sign_up("alice", password, "10.0.0.1")
    with pytest.raises(InvalidInput):
        services.accounts.sign_up("bob", "short", "10.0.0.1")  # a refused sign-up is audited, and not counted
    services.accounts.sign_up("bob", password, "10.0.0.1")
    with pytest.raises(RateLimited, match="Too many new accounts from this address"):
        services.accounts.sign_up("carol", password, "10.0.0.1")
    services.accounts.sign_up("carol", password, "10.0.0.2")
    actions = [(e.action, e.details.get("address")) for e in reversed(services.storage.list_audit())]
    assert actions == [("signup", "10.0.0.1"), ("signup_refused", "10.0.0.1"), ("signup", "10.0.0.1"),
                       ("signup", "10.0.0.2")]
    services.settings.login_failures_per_address = "2/15 minutes"  # refused sign-ups are failed tries too
    with pytest.raises(InvalidInput):
        services.accounts.sign_up("dave", "short", "10.0.0.3")
    with pytest.raises(InvalidInput):
        services.accounts.sign_up("dave", "short", "10.0.0.3")
    with pytest.raises(RateLimited, match="failed tries from this address"):
        services.accounts.sign_up("dave", password, "10.0.0.3")


def test_names_that_fold_to_an_admins_are_refused(services, password):
    """Attacker findings, point 8: adm1n, admín, b0b and vlctim were accepted beside admin, bob and victim."""
    for admin in ("admin", "bob", "victim"):
        services.accounts.ensure_admin(admin, password)
    for name in ("adm1n", "admín", "4dmin", "admln", "b0b", "vlctim", "v1ctim"):
        with pytest.raises(InvalidInput, match="too much like an admin's name"):
            services.accounts.sign_up(name, password)
    for name in ("admiral", "bobby", "victor"):  # near an admin's name is fine
        assert services.accounts.sign_up(name, password).account.username == name
    assert services.storage.find_user("adm1n") is None


def test_the_admin_account_made_at_start_survives_another_process_making_it_first(services, password, monkeypatch):
    """Replicas and workers of one database start together, each with --admin-username."""
    find = services.storage.find_user
    calls = []

    def not_yet_then_found(name):  # the other process creates it between this one's look and its insert
        calls.append(name)
        if len(calls) == 1:
            services.storage.create_user(name, password, is_admin=True)
            return None
        return find(name)

    monkeypatch.setattr(services.storage, "find_user", not_yet_then_found)
    assert services.accounts.ensure_admin("root", password).is_admin
