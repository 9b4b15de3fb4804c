"""The admin page's side: users and their adapters, the probe, the actions on a user, the audit log.

Every method takes the acting user's id and refuses anyone but an admin (app/access.py), whatever
the page showed; every action on a user, and every look into what their history holds (the
probe), is in the audit log.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from adapter_core import GenerativeAdapterModel
from adapter_core.data.conversation import Turn, prompt_ids
from adapter_core.serving.decoding import ReplyRequest, fit_prompt
from adapter_core.inspect import adapter_summary
from adapter_core.serving.sampling import SamplingConfig
from adapter_core.serving.scheduler import InferenceLoop
from storage import NotFound
from storage.models import User

from .access import Access, chosen_id
from .accounts import Accounts
from .api_keys import ApiKeyRow
from .chat import Chat, ReplyFailed
from .downloads import Download, DownloadStore
from .errors import AppError
from .export import Exports
from .memory import Memory, MemoryStatus, built_by, new_tokens


@dataclass(frozen=True)
class AdminUserRow:
    id: int
    username: str
    admin: bool
    messages: int
    adapter_version: int | None
    needs_rebuild: bool
    created_at: datetime


@dataclass(frozen=True)
class SnapshotRow:
    version: int
    created_at: datetime
    cursor: int
    tokens_absorbed: int
    bytes: int
    sha256: str
    """Its first 12 hex digits."""
    compressor: str
    """What built it: 'finetune' or 'generator'."""
    generator: str
    """The id of what built it (the generator's, or the fine-tuning settings')."""
    messages: int | None
    """Messages absorbed by this snapshot (stats of older snapshots may lack it)."""
    new_tokens: int | None
    """Tokens it trained on or absorbed (a rebuild: the whole history)."""
    seconds: float | None
    rebuild: bool | None
    """True for a rebuild from the whole history."""


@dataclass(frozen=True)
class AdminUserDetail:
    username: str
    status: MemoryStatus
    snapshots: tuple[SnapshotRow, ...]


@dataclass(frozen=True)
class LayerSummary:
    """One adapted module of a user's adapter (adapter_core.inspect.adapter_summary)."""

    layer: int
    module: str
    sum_norm: float
    """||S||_F: grows with the history absorbed."""
    delta_norm: float
    """||ΔW||_F of the LoRA it applies."""
    singular_values: tuple[float, ...]
    """Of S, largest first, divided by the largest: how many directions the memory uses."""


@dataclass(frozen=True)
class AuditRow:
    time: datetime
    actor: str | None
    """The acting user's name when it acted (kept after their account is deleted); None: the server."""
    action: str
    user: str | None
    """The name of the user acted on when it was done, if any (kept after a deletion)."""
    details: str
    """The details as JSON."""


@dataclass(frozen=True)
class ProbeAnswer:
    name: str
    """'base model', 'adapter' or 'full history'."""
    text: str
    prompt_tokens: int
    seconds: float


@dataclass(frozen=True)
class Probe:
    answers: tuple[ProbeAnswer, ...]
    seconds: float
    """Wall time of all three (decoded together)."""


class Admin:
    def __init__(self, access: Access, engine: GenerativeAdapterModel, loop: InferenceLoop, accounts: Accounts,
                 chat: Chat, memory: Memory, exports: Exports, downloads: DownloadStore) -> None:
        self.access, self.engine, self.loop = access, engine, loop
        self.accounts, self.chat, self.memory, self.exports, self.downloads = accounts, chat, memory, exports, downloads
        self.storage, self.settings = access.storage, access.settings

    # --- looking ---------------------------------------------------------------------------------

    def users(self, actor_id: object) -> tuple[AdminUserRow, ...]:
        self.access.admin(actor_id)
        return tuple(AdminUserRow(r.user.id, r.user.username, r.user.is_admin, r.messages, r.adapter_version,
                                  r.user.needs_rebuild, r.user.created_at) for r in self.storage.user_summaries())

    def username(self, actor_id: object, user_id: object) -> str:
        """The name of the user an admin is about to act on (for the question asked first)."""
        self.access.admin(actor_id)
        return self.access.target(user_id).username

    def user(self, actor_id: object, user_id: object) -> AdminUserDetail:
        self.access.admin(actor_id)
        user = self.access.target(user_id)
        snapshots = tuple(
            SnapshotRow(s.version, s.created_at, s.cursor, s.tokens_absorbed, s.size_bytes, s.sha256[:12],
                        built_by(s), s.generator_id, s.stats.get("messages"), new_tokens(s), s.stats.get("seconds"),
                        s.stats.get("rebuild"))
            for s in self.storage.list_snapshots(user.id))
        return AdminUserDetail(user.username, self.memory.status_of(self.storage.memory_summary(user.id)), snapshots)

    def adapter_summary(self, actor_id: object, user_id: object) -> tuple[LayerSummary, ...] | None:
        """The user's usable adapter, module by module; None when there is none."""
        self.access.admin(actor_id)
        _, state = self.memory.usable_state(self.access.target(user_id))
        if state is None:
            return None
        return tuple(LayerSummary(r["layer"], r["module"], r["sum_norm"], r["delta_norm"], tuple(r["singular_values"]))
                     for r in adapter_summary(self.engine, state))

    def probe(self, actor_id: object, user_id: object, question: object) -> Probe:
        """One question answered three ways: base model, the user's adapter, full history in the
        prompt (its earliest turns dropped where it would not fit), decoded together."""
        actor = self.access.admin(actor_id)
        self.access.costly(actor.id)
        question, _ = self.chat.check_message(question.strip() if isinstance(question, str) else question,
                                              field="question")
        user = self.access.target(user_id)
        _, state = self.memory.usable_state(user)
        tok = self.engine.tokenizer
        history, _ = fit_prompt(tok, question, [Turn(m.role, m.text) for m in self.storage.history(user.id)],
                                self.chat.prompt_room)
        bare = tuple(prompt_ids(tok, question))
        # greedy, so that the three answers differ only by what the model was shown
        sampling = SamplingConfig.greedy(self.settings.max_new_tokens,
                                         repetition_penalty=SamplingConfig.repetition_penalty)
        cases = {"base model": ReplyRequest(bare, None, sampling), "adapter": ReplyRequest(bare, state, sampling),
                 "full history": ReplyRequest(tuple(history), None, sampling)}
        started = time.perf_counter()
        replies = self.loop.reply(list(cases.values()))
        took = time.perf_counter() - started
        answers = []
        for name, reply in zip(cases, replies):
            if reply.finish not in ("end", "length"):
                raise ReplyFailed(f"the {name}'s answer ended as {reply.finish!r}")
            text = "(no adapter yet) " + reply.text if name == "adapter" and state is None else reply.text
            answers.append(ProbeAnswer(name, text, reply.prompt_tokens, reply.total_s))
        # the answers show what the user's history holds: who looked is on record
        self.storage.record_audit(actor.id, "probe", user.id, {"question": question[:200]})
        return Probe(tuple(answers), took)

    def audit(self, actor_id: object, limit: int = 100) -> tuple[AuditRow, ...]:
        self.access.admin(actor_id)
        return tuple(AuditRow(e.created_at, e.actor_name, e.action, e.target_name, json.dumps(e.details))
                     for e in self.storage.list_audit(limit=limit))

    def api_keys(self, actor_id: object, user_id: object) -> tuple[ApiKeyRow, ...]:
        """The user's API keys (never the keys themselves: only their hashes are kept)."""
        self.access.admin(actor_id)
        return tuple(ApiKeyRow.of(k) for k in self.storage.list_api_keys(self.access.target(user_id).id))

    # --- acting ----------------------------------------------------------------------------------

    def revoke_api_key(self, actor_id: object, user_id: object, key_id: object) -> ApiKeyRow:
        """Revoke one of the user's API keys (audited); requests with it fail from now on."""
        actor, user = self.access.admin(actor_id), self.access.target(user_id)
        chosen = chosen_id("key", key_id)
        if chosen is None:
            raise AppError("Choose one of the user's keys first")
        try:
            return ApiKeyRow.of(self.storage.delete_api_key(user.id, chosen, actor_id=actor.id))
        except NotFound:  # revoked meanwhile, or a key of another user (a custom value of the list)
            raise AppError(f"{user.username} has no such key (any more)") from None

    def rebuild(self, actor_id: object, user_id: object) -> str:
        """Queue a rebuild of the user's adapter from their history; the user's name."""
        actor, user = self.access.admin(actor_id), self.access.target(user_id)
        with _still_there():
            self.storage.request_rebuild(user.id, actor_id=actor.id)
        self.memory.drop_state(user.id)
        self.storage.queue_job(user.id)
        return user.username

    def reset(self, actor_id: object, user_id: object) -> str:
        """Delete the user's messages and adapters, keeping the account; the user's name."""
        actor, user = self.access.admin(actor_id), self.access.target(user_id)
        with _still_there():
            self.storage.reset_memory(user.id, actor_id=actor.id)
        self.memory.drop_state(user.id)
        self.downloads.remove_user(user.id)
        return user.username

    def export_peft(self, actor_id: object, user_id: object, address: str | None = None) -> Download:
        """A link for the admin to the user's adapter as a PEFT LoRA (zip)."""
        actor, user = self.access.admin(actor_id), self.access.target(user_id)
        self.access.costly(actor.id)
        return self.exports.peft_adapter(actor, user, address)

    def deletable(self, actor_id: object, user_id: object) -> str:
        """The name of a user this admin may delete (asked before the page's question); AppError
        for the admin's own account."""
        actor, user = self.access.admin(actor_id), self.access.target(user_id)
        _refuse_own(actor, user)
        return user.username

    def delete_user(self, actor_id: object, user_id: object) -> str:
        """Delete the account and all its data; the user's name."""
        actor, user = self.access.admin(actor_id), self.access.target(user_id)
        _refuse_own(actor, user)
        with _still_there():
            self.storage.delete_user(user.id, actor_id=actor.id)
        self.memory.drop_state(user.id)
        self.downloads.remove_user(user.id)
        return user.username

    def set_signup(self, actor_id: object, open_: bool) -> None:
        actor = self.access.admin(actor_id)
        self.accounts.signup_open = bool(open_)
        self.storage.record_audit(actor.id, "set_signup", None, {"open": self.accounts.signup_open})


@contextlib.contextmanager
def _still_there() -> Iterator[None]:
    """The user an admin acts on was deleted meanwhile (by another admin): a refusal, not a fault."""
    try:
        yield
    except NotFound:
        raise AppError("That user no longer exists") from None


def _refuse_own(actor: User, user: User) -> None:
    if user.id == actor.id:  # the Memory tab's "Delete my account" asks its own question
        raise AppError("Admins cannot delete their own account here: use Delete my account on the Memory tab")
