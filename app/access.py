"""Who is acting, and what they may do: the one place every service checks it.

Who acts is an Actor: on the page, the secret of its login (the browser's HttpOnly cookie, read
by app/page_login.py for each event), which names a row of storage's login_sessions; in the API, the id of the user whose key this very
request carried. Every service call passes it here, which reads the user again from the database,
so that a logout, a deleted account or a revoked admin right takes effect at the next click. A page
never holds a user id: an id outlives its account, a login does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage import NotFound, Storage, validation
from storage.models import User

from .errors import AccessDenied, AppError
from .limits import RateLimits
from .settings import AppSettings


Actor = int | str
"""Who acts: a user id resolved from an API key within the current request, or a page's login secret."""


@dataclass(frozen=True)
class Access:
    storage: Storage
    settings: AppSettings
    limits: RateLimits

    def user(self, actor: object) -> User:
        """The acting user; AccessDenied when nobody is: no login, one that ended (logout, expiry,
        account deleted), or an account since deleted."""
        if isinstance(actor, str):
            user = self.storage.login_user(actor)
            if user is None:
                raise AccessDenied("Please log in")
            return user
        if not isinstance(actor, int) or isinstance(actor, bool):
            raise AccessDenied("Please log in")
        try:
            return self.storage.get_user(actor)
        except NotFound:
            raise AccessDenied("Please log in") from None

    def user_id(self, actor: object) -> int:
        """The acting user's id, for a call whose own transaction then reads the user (and finds
        it deleted, NotFound): a login is read here (one transaction), an API request's id is not
        read again."""
        if isinstance(actor, int) and not isinstance(actor, bool):
            return actor
        return self.user(actor).id

    def admin(self, actor_id: object) -> User:
        """The acting admin; AccessDenied for anyone else."""
        actor = self.user(actor_id)
        if not actor.is_admin:
            raise AccessDenied("Admins only")
        return actor

    def target(self, user_id: object) -> User:
        """The user an admin acts on, chosen on the page."""
        chosen = chosen_id("user", user_id)
        if chosen is None:
            raise AppError("Choose a user from the list")
        try:
            return self.storage.get_user(chosen)
        except NotFound:
            raise AppError("That user no longer exists") from None

    def api_user(self, key: object, address: str | None) -> User:
        """The user an API key belongs to (app/openai_api.py); AccessDenied for no key, or one that
        is malformed, revoked or unknown (a deleted account's keys went with it). Wrong keys are
        counted per client address and, once too many came, refused (RateLimited), with the failed
        logins' limit but a count of their own: a client left with an old key must not lock its
        address out of the page's login. A right key is always let in, however many wrong ones
        its address sent: every local client shares 127.0.0.1, and one misconfigured client must
        not lock out the others (a key is 256 random bits: the count guards the log and the
        database, not the keys)."""
        if key is None or key == "":
            raise AccessDenied("No API key: send one as 'Authorization: Bearer <key>' (make one on the Memory tab)")
        holder = self.storage.find_api_key(key)  # a malformed key is not looked up
        if holder is not None:
            return holder.user
        limit = self.settings.login_failures_per_address
        self.limits.check(limit, "api-key", str(address), what="Too many requests with a wrong API key from here")
        self.limits.record(limit, "api-key", str(address))
        raise AccessDenied("Invalid API key: it was revoked or mistyped, or its account was deleted")

    def costly(self, user_id: int) -> None:
        """Count one costly action (export, compress now, probe) against the user's limit."""
        self.limits.hit(self.settings.actions_per_user, "action", str(user_id),
                        what="That was asked for several times in a short while")


def chosen_id(field: str, value: object) -> int | None:
    """A row id chosen on the page (a dropdown's custom value can be anything); None if it is none."""
    try:
        return validation.count(field, int(str(value)))
    except (TypeError, ValueError):  # storage's ValidationError is a ValueError
        return None
