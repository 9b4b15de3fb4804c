"""Accounts: signing up, logging in and out, who is logged in, and the admin account made at start.

Failed logins and sign-ups are rate limited in memory (app/limits.py) per normalised name and
client address, and every one of them is in the audit log; nothing here ever sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage import NotFound, UsernameTaken, validation
from storage.models import User

from .access import Access
from .downloads import DownloadStore
from .errors import AccessDenied, InvalidInput, LoginFailed, refusing
from .memory import Memory


@dataclass(frozen=True)
class Account:
    id: int
    username: str
    is_admin: bool

    @classmethod
    def of(cls, user: User) -> Account:
        return cls(user.id, user.username, user.is_admin)


@dataclass(frozen=True)
class Login:
    """A browser that logged in or signed up: who it is, and the secret its page acts with (the
    only thing the page keeps: see app/access.py)."""

    account: Account
    secret: str


class Accounts:
    def __init__(self, access: Access, downloads: DownloadStore, memory: Memory) -> None:
        self.access, self.downloads, self.memory = access, downloads, memory
        self.storage, self.settings, self.limits = access.storage, access.settings, access.limits
        self.signup_open = self.settings.allow_signup
        """Whether anyone may create an account; admins switch it at run time (app/admin.py)."""

    def sign_up(self, username: str, password: str, address: str | None = None) -> Login:
        if not self.signup_open:
            raise AccessDenied("Sign-up is closed; ask an admin for an account")
        per_address, per_server = self.settings.signups_per_address, self.settings.signups_per_server
        failures = self.settings.login_failures_per_address  # refused sign-ups count as failed tries too
        self.limits.check(failures, "login", str(address), what="Too many failed tries from this address")
        try:
            with refusing():
                # the rules first, so that a mistake is told as such, then the limits
                checked = validation.username(username, self.storage.settings)
                validation.password(password, self.storage.settings)
                self._refuse_admin_look_alike(checked)
                self.limits.check(per_address, "signup", str(address), what="Too many new accounts from this address")
                self.limits.check(per_server, "signup", what="Too many new accounts just now")
                user = self.storage.create_user(username, password)
        except InvalidInput as e:
            self.limits.record(failures, "login", str(address))
            self.storage.record_audit(None, "signup_refused", None, {
                "username": validation.normalize_username(str(username))[:64], "reason": e.reason[:200],
                "address": address})
            raise
        self.limits.record(per_address, "signup", str(address))
        self.limits.record(per_server, "signup")
        self.storage.record_audit(user.id, "signup", user.id, {"address": address})
        return self._login(user)

    def _refuse_admin_look_alike(self, name: str) -> None:
        folded = validation.admin_fold(name)
        if any(validation.admin_fold(u.username) == folded for u in self.storage.list_users(admins_only=True)):
            raise InvalidInput("username", "is too much like an admin's name; choose another")

    def log_in(self, username: str, password: str, address: str | None = None) -> Login:
        """Failures are counted per normalised name and address, and per address; once either is
        used up, tries are refused at once (no password is checked, nobody waits)."""
        name = validation.normalize_username(str(username))[:64]
        per_name, per_address = self.settings.login_failures_per_name, self.settings.login_failures_per_address
        self.limits.check(per_name, "login", name, str(address), what="Too many failed logins for this account")
        self.limits.check(per_address, "login", str(address), what="Too many failed logins from this address")
        user = self.storage.authenticate(username, password)
        if user is None:
            self.limits.record(per_name, "login", name, str(address))
            self.limits.record(per_address, "login", str(address))
            known = self.storage.find_user(name)
            self.storage.record_audit(None, "login_failed", known.id if known else None,
                                      {"username": name, "address": address})
            raise LoginFailed("Wrong username or password")
        self.limits.clear(per_name, "login", name, str(address))
        return self._login(user)

    def _login(self, user: User) -> Login:
        try:
            return Login(Account.of(user), self.storage.start_login(user.id).secret)
        except NotFound:  # deleted in between
            raise AccessDenied("That account was just deleted") from None

    def log_out(self, actor: object, *, everywhere: bool = False) -> int:
        """End this page's login (everywhere: every login of its user, on every browser) and drop
        the download links it was handed; how many logins ended. Nothing for a page whose login
        had already ended."""
        try:
            user = self.access.user(actor)
        except AccessDenied:
            return 0
        self.downloads.remove_user(user.id)
        if everywhere:
            return self.storage.end_logins(user.id)
        self.storage.end_login(actor)
        return 1

    def delete_own(self, user_id: object) -> str:
        """Delete the user's own account and all its data (its API keys stop working with the
        commit); the username it had."""
        user = self.access.user(user_id)
        try:
            self.storage.delete_user(user.id, actor_id=user.id)
        except NotFound:  # deleted meanwhile
            raise AccessDenied("Please log in") from None
        self.memory.drop_state(user.id)
        self.downloads.remove_user(user.id)
        return user.username

    def whoami(self, user_id: object) -> Account:
        return Account.of(self.access.user(user_id))

    def exists(self, user_id: int) -> bool:
        """Whether the account still exists (a download link dies with its owner)."""
        try:
            self.access.user(user_id)
        except AccessDenied:
            return False
        return True

    def ensure_admin(self, username: str, password: str) -> Account:
        """Create the configured admin account, or promote it; used at start."""
        user = self.storage.find_user(username)
        if user is None:
            try:
                user = self.storage.create_user(username, password, is_admin=True)
            except UsernameTaken:  # another process of the cluster, starting at the same moment, made it
                user = self.storage.find_user(username)
                if user is None:
                    raise
        if not user.is_admin:
            user = self.storage.set_admin(user.id, True)
        return Account.of(user)

    def any_admin(self) -> bool:
        return bool(self.storage.list_users(admins_only=True))
