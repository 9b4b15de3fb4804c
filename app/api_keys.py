"""API keys: a user makes, lists and revokes the keys that let programs act as them through the
OpenAI-compatible API (app/openai_api.py); admins list and revoke anyone's (app/admin.py).

A key is shown once, when it is made; storage keeps only its hash (storage.repository), so a
lost key cannot be shown again, only revoked and replaced. Which user a key acts as is decided
in one place, Access.api_user.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from storage.models import ApiKey

from .access import Access, chosen_id
from .errors import Gone, refusing


@dataclass(frozen=True)
class ApiKeyRow:
    """A key as its owner (or an admin) sees it in a list: never the key itself."""

    id: int
    name: str | None
    hint: str
    """Its first and last characters ('sk-mc-Ab…wxyz')."""
    created_at: datetime
    last_used_at: datetime | None
    """To the minute; None if no request has used it yet."""

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyRow:
        return cls(key.id, key.name, key.hint, key.created_at, key.last_used_at)


@dataclass(frozen=True)
class NewApiKey:
    row: ApiKeyRow
    secret: str
    """The key: to be shown to its owner now, and never again."""


class ApiKeys:
    def __init__(self, access: Access) -> None:
        self.access, self.storage = access, access.storage

    def whose(self, key: object, address: str | None) -> int:
        """The id of the user the API key acts as (Access.api_user decides: AccessDenied for a
        missing, wrong or revoked key, RateLimited after too many wrong ones from the address)."""
        return self.access.api_user(key, address).id

    def mine(self, user_id: object) -> tuple[ApiKeyRow, ...]:
        user = self.access.user(user_id)
        return tuple(ApiKeyRow.of(k) for k in self.storage.list_api_keys(user.id))

    def create(self, user_id: object, name: object = None) -> NewApiKey:
        """A new key (audited); InvalidInput for a name that cannot be taken or too many keys."""
        user = self.access.user(user_id)
        with refusing():
            made = self.storage.create_api_key(user.id, name)
        return NewApiKey(ApiKeyRow.of(made.key), made.secret)

    def revoke(self, user_id: object, key_id: object) -> ApiKeyRow:
        """Revoke one of the user's keys: requests with it fail from now on. Gone for a key that
        is not theirs, exactly as for one that does not exist."""
        user = self.access.user(user_id)
        chosen = chosen_id("key", key_id)
        if chosen is None:
            raise Gone()
        with refusing():
            return ApiKeyRow.of(self.storage.delete_api_key(user.id, chosen, actor_id=user.id))
