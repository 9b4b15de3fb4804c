"""The chat service: what the UI (and the API) can do, with every access checked here.

It joins storage (what is remembered) and the adapter engine (how memory becomes weights). No
UI code: every method can be called, and is tested, without Gradio. Methods take the acting
user's id as the UI's session holds it; whatever they touch is that user's own, except the
admin methods, which re-read the actor from the database and refuse non-admins.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from adapter_core import AdapterState, GenerativeAdapterModel, StateError, export_peft
from adapter_core.conversation import Turn, history_text, prompt_ids
from adapter_core.inspect import adapter_summary
from adapter_core.sampling import SamplingConfig
from storage import validation
from storage import CursorError, NotFound, RebuildRequired, SnapshotFileError, Storage, ValidationError

from .downloads import Download, DownloadStore
from .errors import AccessDenied, AppError, LoginFailed
from .limits import RateLimits
from .settings import AppSettings

log = logging.getLogger(__name__)


@dataclass
class ReplyStats:
    prompt_tokens: int
    pending_turns: int
    """Turns in the prompt because they are not in the adapter yet (the new message included)."""
    adapter_version: int | None
    first_token_s: float
    total_s: float
    reply_tokens: int

    def line(self) -> str:
        adapter = f"adapter v{self.adapter_version}" if self.adapter_version else "no adapter yet"
        turns = "turn" if self.pending_turns == 1 else "turns"
        return (f"{self.prompt_tokens} prompt tokens ({self.pending_turns} {turns} not yet in memory) · {adapter} · "
                f"first token {self.first_token_s:.2f} s · {self.reply_tokens} tokens in {self.total_s:.2f} s")


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    seconds: float


class ChatService:
    def __init__(self, storage: Storage, engine: GenerativeAdapterModel, settings: AppSettings,
                 limits: RateLimits | None = None, downloads: DownloadStore | None = None):
        self.storage, self.engine, self.settings = storage, engine, settings
        self.limits = limits or RateLimits()
        self.downloads = downloads or DownloadStore(settings.data_dir / "download-links")
        self.signup_open = settings.allow_signup
        self._states: dict[int, tuple[int, AdapterState]] = {}  # user -> (snapshot id, state)
        self._states_lock = threading.Lock()
        self._reported: set[int] = set()  # damaged snapshots already reported

    # --- accounts ------------------------------------------------------------------------------

    def sign_up(self, username: str, password: str, address: str | None = None) -> int:
        if not self.signup_open:
            raise AccessDenied("Sign-up is closed; ask an admin for an account")
        per_address, per_server = self.settings.signups_per_address, self.settings.signups_per_server
        failures = self.settings.login_failures_per_address  # refused sign-ups count as failed tries too
        self.limits.check(failures, "login", str(address), what="Too many failed tries from this address")
        try:
            # the rules first, so that a mistake is told as such, then the limits
            validation.username(username, self.storage.settings)
            validation.password(password, self.storage.settings)
            self.limits.check(per_address, "signup", str(address), what="Too many new accounts from this address")
            self.limits.check(per_server, "signup", what="Too many new accounts just now")
            user = self.storage.create_user(username, password)
        except ValidationError as e:
            self.limits.record(failures, "login", str(address))
            self.storage.record_audit(None, "signup_refused", None, {
                "username": validation.normalize_username(str(username))[:64], "reason": e.reason[:200],
                "address": address})
            raise
        self.limits.record(per_address, "signup", str(address))
        self.limits.record(per_server, "signup")
        self.storage.record_audit(user.id, "signup", user.id, {"address": address})
        return user.id

    def log_in(self, username: str, password: str, address: str | None = None) -> int:
        """The user's id. Failures are counted per normalised name and address, and per address;
        once either is used up, tries are refused at once (no password is checked, nobody waits)."""
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
        return user.id

    def log_out(self, user_id: int | None) -> None:
        """Drop what this browser session was handed (its download links)."""
        if user_id is not None:
            self.downloads.remove_user(int(user_id))

    def user_exists(self, user_id: int) -> bool:
        try:
            self.storage.get_user(int(user_id))
        except NotFound:
            return False
        return True

    def ensure_admin(self, username: str, password: str) -> int:
        """Create the configured admin account, or promote it; used at start."""
        user = self.storage.find_user(username)
        if user is None:
            user = self.storage.create_user(username, password, is_admin=True)
        elif not user.is_admin:
            self.storage.set_admin(user.id, True)
        return user.id

    def whoami(self, user_id: int | None) -> dict:
        user = self._user(user_id)
        return {"id": user.id, "username": user.username, "is_admin": user.is_admin}

    # --- chat ------------------------------------------------------------------------------------

    def history(self, user_id: int | None) -> list[dict]:
        user = self._user(user_id)
        return [{"id": m.id, "role": m.role, "text": m.text, "absorbed": m.snapshot_id is not None,
                 "created_at": m.created_at.isoformat()} for m in self.storage.history(user.id)]

    def reply(self, user_id: int | None, text: str) -> Iterator[str | ReplyStats]:
        """Store the message, stream the reply (chunks of text), store it, then yield its stats."""
        user = self._user(user_id)
        tok = self.engine.tokenizer
        text, tokens = self.check_message(text)
        self.limits.hit(self.settings.messages_per_user, "message", str(user.id),
                        what="You are sending messages faster than the model can answer")
        conversation = self._conversation(user.id)
        message = self.storage.append_message(user.id, conversation, "user", text, tokens)
        snapshot, state = self._current_state(user.id)
        cursor = snapshot.cursor if state is not None else 0
        pending = [Turn(m.role, m.text) for m in self.storage.messages_after(user.id, cursor) if m.id < message.id]
        pending = self._fit(pending, min(self.settings.recent_token_budget, self._message_room() - tokens))
        ids = prompt_ids(tok, message.text, pending)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        started = time.perf_counter()
        first_token = None
        outcome: dict[str, bool] = {}
        stop = threading.Event()
        generation = threading.Thread(target=self._generate, args=(ids, state, streamer, outcome, stop),
                                      daemon=True)
        generation.start()
        parts = []
        try:
            for chunk in map(_printable, streamer):
                if chunk:
                    first_token = first_token or time.perf_counter()
                    parts.append(chunk)
                    yield chunk
        finally:  # a reader that went away (logged out, disconnected) stops the decoding too
            stop.set()
        generation.join()
        answer = "".join(parts).strip()
        if outcome.get("hit_cap"):  # cut off by the length cap: keep the whole sentences
            answer = _whole_sentences(answer)
        answer = answer or "…"
        stored = self.storage.append_message(user.id, conversation, "assistant", answer,
                                             len(tok(answer, add_special_tokens=False)["input_ids"]))
        self._maybe_queue(user.id)
        total = time.perf_counter() - started
        yield ReplyStats(len(ids), len(pending) + 1, snapshot.version if state is not None else None,
                         (first_token or time.perf_counter()) - started, total, stored.token_count)

    def check_message(self, text: object) -> tuple[str, int]:
        """The message as it will be stored, and its tokens; a ValidationError if it cannot be sent."""
        if isinstance(text, str) and len(text) > self.settings.max_message_chars:  # refused unread
            raise ValidationError("text", f"is too long: {len(text):,} characters, at most "
                                          f"{self.settings.max_message_chars:,}")
        text = validation.message_text(text, self.storage.settings)
        tokens = len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        room = self._message_room()
        if tokens > room:
            raise ValidationError("text", f"is too long for the model: {tokens:,} tokens, at most {room:,}")
        return text, tokens

    def _generate(self, ids: list[int], state: AdapterState | None, streamer, outcome: dict[str, bool],
                  stop: threading.Event) -> None:
        """Decode into the streamer until the end of the turn, the length cap or `stop`;
        outcome['hit_cap'] says whether the reply ran to the length cap."""
        sampling = SamplingConfig(max_new_tokens=self.settings.max_new_tokens)
        kwargs = sampling.generate_kwargs(self.engine.tokenizer)
        try:
            with torch.inference_mode():
                out = self.engine.generate(torch.tensor([ids], device=self.engine.device),
                                           states=[state] if state is not None else None, streamer=streamer,
                                           stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]), **kwargs)
            written = out[0, len(ids):].tolist()
            outcome["hit_cap"] = len(written) >= sampling.max_new_tokens and written[-1] not in kwargs["eos_token_id"]
        except Exception:  # the streamer must end, or the reply would hang
            log.exception("generation failed")
            streamer.end()

    def _prompt_room(self) -> int:
        """Prompt tokens the model can take and still write a whole reply."""
        return self.engine.base_model.config.max_position_embeddings - self.settings.max_new_tokens

    def _message_room(self) -> int:
        """Tokens left for the new message and the pending turns, besides the system text and framing."""
        return self._prompt_room() - len(prompt_ids(self.engine.tokenizer, ""))

    def _fit(self, turns: list[Turn], budget: int) -> list[Turn]:
        """The most recent pending turns within the token budget (older ones wait for compression)."""
        tok, kept, total = self.engine.tokenizer, [], 0
        for turn in reversed(turns):
            total += len(tok(turn.text, add_special_tokens=False)["input_ids"]) + 5
            if total > budget:
                break
            kept.insert(0, turn)
        return kept

    def _conversation(self, user_id: int) -> int:
        conversations = self.storage.list_conversations(user_id)
        return conversations[-1].id if conversations else self.storage.start_conversation(user_id).id

    # --- memory ----------------------------------------------------------------------------------

    def memory_status(self, user_id: int | None) -> dict:
        user = self._user(user_id)
        snapshot = self.storage.latest_snapshot(user.id)
        job = self._active_job(user.id)
        return {
            **self.storage.message_counts(user.id),  # counted by the database: this runs on a timer
            "adapter_version": snapshot.version if snapshot else None,
            "last_compression": snapshot.created_at.isoformat(timespec="seconds") if snapshot else None,
            "needs_rebuild": user.needs_rebuild,
            "job": job,
        }

    def compress_now(self, user_id: int | None) -> None:
        user = self._user(user_id)
        self._costly(user.id)
        self.storage.queue_job(user.id)

    def forget(self, user_id: int | None, message_id: object) -> int:
        """Delete one of the user's messages and, for a message of theirs, the reply to it; until
        the rebuild lands, answers use no adapter (it may hold them). The number deleted."""
        user = self._user(user_id)
        chosen = _chosen_id("message", message_id)
        if chosen is None:
            raise NotFound(f"no message {message_id!r}")
        deleted = self.storage.delete_message(user.id, chosen, with_reply=True)
        self._drop_state(user.id)
        self.downloads.remove_user(user.id)  # an export made before holds what was forgotten
        self.storage.queue_job(user.id)
        return len(deleted)

    def export(self, user_id: int | None, address: str | None = None) -> Download:
        """A link to a zip of the user's history (JSON) and adapter (state file + PEFT LoRA folder)."""
        user = self._user(user_id)
        self._costly(user.id)
        snapshot, state = self._current_state(user.id)
        history = self.history(user.id)

        def write(archive: Path) -> None:
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("history.json", json.dumps({"user": user.username, "messages": history},
                                                      indent=2, ensure_ascii=False))
                if state is not None:
                    z.writestr("adapter/state.safetensors", state.to_bytes())
                    self._zip_peft(z, state, "adapter/peft/")
                    z.writestr("adapter/snapshot.json", json.dumps({
                        "version": snapshot.version, "generator_id": snapshot.generator_id,
                        "base_model_id": snapshot.base_model_id, "tokens_absorbed": snapshot.tokens_absorbed},
                        indent=2))

        download = self.downloads.add(user.id, f"memchat-{user.username}.zip", write, address)
        self.storage.record_audit(user.id, "export", user.id, {"address": address})
        return download

    def _zip_peft(self, z: zipfile.ZipFile, state: AdapterState, prefix: str) -> None:
        """The state as a PEFT LoRA folder inside the zip (built in a private scratch folder)."""
        scratch = self.downloads.scratch()
        try:
            peft = export_peft(self.engine, state, scratch / "peft")
            for f in sorted(peft.iterdir()):
                z.write(f, f"{prefix}{f.name}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _costly(self, user_id: int) -> None:
        """Count one costly action (export, compress now, probe) against the user's limit."""
        self.limits.hit(self.settings.actions_per_user, "action", str(user_id),
                        what="That was asked for several times in a short while")

    # --- compression (called by the worker) ---------------------------------------------------------

    def compress(self, user_id: int) -> int | None:
        """Absorb the user's new turns (or rebuild from scratch when needed); the new version or None."""
        user = self.storage.get_user(user_id)
        latest = self.storage.latest_snapshot(user_id)
        state = None
        if latest is not None and not user.needs_rebuild:
            _, state = self._current_state(user_id)
        if user.needs_rebuild or (latest is not None and state is None):
            return self._rebuild(user_id)
        pending = self.storage.messages_after(user_id, latest.cursor if latest else 0)
        if not pending:
            return None
        started = time.perf_counter()
        new = self.engine.absorb(state or self.engine.empty_state(), history_text([Turn(m.role, m.text) for m in pending]),
                                 windows_per_pass=4)
        try:
            snapshot = self.storage.commit_snapshot(
                user_id, new.to_bytes(), generator_id=self.engine.generator_id,
                base_model_id=self.engine.base_model_id, cursor=pending[-1].id, tokens_absorbed=new.tokens,
                stats=self._stats(new, len(pending), time.perf_counter() - started))
        except RebuildRequired:
            return self._rebuild(user_id)
        except CursorError:  # another compression absorbed these turns first: nothing left to do
            log.info("user %s: turns up to %s were already absorbed", user_id, pending[-1].id)
            return None
        self._keep_state(user_id, snapshot.id, new)
        return snapshot.version

    def _rebuild(self, user_id: int) -> int:
        revision = self.storage.get_user(user_id).history_revision
        messages = self.storage.history(user_id)
        started = time.perf_counter()
        state = self.engine.absorb(self.engine.empty_state(),
                                   history_text([Turn(m.role, m.text) for m in messages]), windows_per_pass=4)
        snapshot = self.storage.commit_snapshot(
            user_id, state.to_bytes(), generator_id=self.engine.generator_id, base_model_id=self.engine.base_model_id,
            cursor=messages[-1].id if messages else 0, tokens_absorbed=state.tokens,
            stats=self._stats(state, len(messages), time.perf_counter() - started) | {"rebuild": True},
            rebuild_revision=revision)
        self._keep_state(user_id, snapshot.id, state)
        return snapshot.version

    def queue_idle(self, now_ts: float) -> list[int]:
        """Queue compression for users whose newest pending message is older than the idle delay."""
        if not self.settings.compress_idle_seconds:
            return []
        queued = []
        for user_id, _count, newest in self.storage.pending_users():
            if now_ts - newest.timestamp() >= self.settings.compress_idle_seconds and self._active_job(user_id) is None:
                self.storage.queue_job(user_id)
                queued.append(user_id)
        return queued

    def _maybe_queue(self, user_id: int) -> None:
        pending = [m for m in self.storage.messages_after(user_id, self._cursor(user_id)) if m.role == "user"]
        if len(pending) >= self.settings.compress_every:
            self.storage.queue_job(user_id)

    @staticmethod
    def _stats(state: AdapterState, messages: int, seconds: float) -> dict:
        return {"tokens": state.tokens, "windows": state.chunks, "messages": messages,
                "seconds": round(seconds, 3), "state_bytes": state.nbytes()}

    # --- states ----------------------------------------------------------------------------------

    def _cursor(self, user_id: int) -> int:
        snapshot = self.storage.latest_snapshot(user_id)
        return snapshot.cursor if snapshot else 0

    def _current_state(self, user_id: int):
        """(latest snapshot, its state), or (snapshot or None, None) when there is no usable one:
        none yet, a rebuild pending (it may hold forgotten messages), or a damaged file."""
        snapshot = self.storage.latest_snapshot(user_id)
        if snapshot is None or self.storage.get_user(user_id).needs_rebuild:
            return snapshot, None
        with self._states_lock:
            cached = self._states.get(user_id)
        if cached is not None and cached[0] == snapshot.id:
            return snapshot, cached[1]
        try:
            state = AdapterState.from_bytes(self.storage.read_snapshot(user_id, snapshot.id),
                                            self.engine.generator_id, self.engine.base_model_id)
        except (SnapshotFileError, StateError) as e:
            self._report_damage(user_id, snapshot, e)
            return snapshot, None
        self._keep_state(user_id, snapshot.id, state)
        return snapshot, state

    def _report_damage(self, user_id: int, snapshot, error: Exception) -> None:
        """A snapshot that cannot be used: say so once (audit log, shown on the admin page) and have
        the adapter rebuilt from the history; answers use no adapter meanwhile."""
        log.warning("user %s: adapter snapshot v%s unusable (%s); answering without it until rebuilt", user_id,
                    snapshot.version, error)
        with self._states_lock:
            if snapshot.id in self._reported:
                return
            self._reported.add(snapshot.id)
        self.storage.record_audit(None, "adapter_unreadable", user_id,
                                  {"version": snapshot.version, "error": str(error)[:300]})
        self.storage.request_rebuild(user_id)
        self.storage.queue_job(user_id)

    def _keep_state(self, user_id: int, snapshot_id: int, state: AdapterState) -> None:
        with self._states_lock:
            self._states[user_id] = (snapshot_id, state)

    def _drop_state(self, user_id: int) -> None:
        with self._states_lock:
            self._states.pop(user_id, None)

    def _active_job(self, user_id: int) -> dict | None:
        job = self.storage.active_job(user_id)
        if job is None:
            return None
        return {"id": job.id, "status": job.status, "attempts": job.attempts, "error": job.error,
                "not_before": job.not_before.isoformat(timespec="seconds")}

    # --- admin -----------------------------------------------------------------------------------

    def _user(self, user_id: int | None):
        if user_id is None:
            raise AccessDenied("Please log in")
        try:
            return self.storage.get_user(int(user_id))
        except (NotFound, TypeError, ValueError):
            raise AccessDenied("Please log in") from None

    def _admin(self, actor_id: int | None):
        actor = self._user(actor_id)
        if not actor.is_admin:
            raise AccessDenied("Admins only")
        return actor

    def _target(self, user_id: object):
        """The user an admin acts on."""
        chosen = _chosen_id("user", user_id)
        if chosen is None:
            raise AppError("Choose a user from the list")
        try:
            return self.storage.get_user(chosen)
        except NotFound:
            raise AppError("That user no longer exists") from None

    def admin_username(self, actor_id: int | None, user_id: int) -> str:
        """The name of the user an admin is about to act on (for the question asked first)."""
        self._admin(actor_id)
        return self._target(user_id).username

    def admin_users(self, actor_id: int | None) -> list[dict]:
        self._admin(actor_id)
        rows = []
        for user in self.storage.list_users():
            snapshot = self.storage.latest_snapshot(user.id)
            rows.append({"id": user.id, "username": user.username, "admin": user.is_admin,
                         "messages": self.storage.message_counts(user.id)["messages"],
                         "adapter_version": snapshot.version if snapshot else None,
                         "needs_rebuild": user.needs_rebuild, "created_at": user.created_at.isoformat(timespec="seconds")})
        return rows

    def admin_user(self, actor_id: int | None, user_id: int) -> dict:
        self._admin(actor_id)
        user = self._target(user_id)
        status = self.memory_status(user.id)
        snapshots = [{"version": s.version, "created_at": s.created_at.isoformat(timespec="seconds"),
                      "cursor": s.cursor, "tokens_absorbed": s.tokens_absorbed, "bytes": s.size_bytes,
                      "sha256": s.sha256[:12], "generator": s.generator_id, **{k: v for k, v in s.stats.items()
                                                                              if k in ("messages", "seconds", "rebuild")}}
                     for s in self.storage.list_snapshots(user.id)]
        return {"username": user.username, "status": status, "snapshots": snapshots}

    def admin_adapter_summary(self, actor_id: int | None, user_id: int) -> list[dict] | None:
        self._admin(actor_id)
        _, state = self._current_state(self._target(user_id).id)
        return None if state is None else adapter_summary(self.engine, state)

    def admin_probe(self, actor_id: int | None, user_id: int, question: str,
                    on_step: Callable[[int, int, str], None] | None = None) -> dict[str, Answer]:
        """One question answered three ways: base model, the user's adapter, full history in the
        prompt; on_step(done, total, name) is called before each answer (it takes a while)."""
        actor = self._admin(actor_id)
        self._costly(actor.id)
        if not isinstance(question, str) or not question.strip():
            raise ValidationError("question", "is empty")
        question, _ = self.check_message(question.strip())
        user_id = self._target(user_id).id
        _, state = self._current_state(user_id)
        turns = [Turn(m.role, m.text) for m in self.storage.history(user_id)]
        tok = self.engine.tokenizer
        limit = self._prompt_room()
        while turns and len(prompt_ids(tok, question, turns)) > limit:
            turns = turns[1:]
        cases = {"base model": (prompt_ids(tok, question), None),
                 "adapter": (prompt_ids(tok, question), state),
                 "full history": (prompt_ids(tok, question, turns), None)}
        # greedy, so that the three answers differ only by what the model was shown
        sampling = SamplingConfig.greedy(self.settings.max_new_tokens,
                                         repetition_penalty=SamplingConfig.repetition_penalty)
        answers = {}
        for done, (name, (ids, use_state)) in enumerate(cases.items()):
            if on_step is not None:
                on_step(done, len(cases), name)
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.engine.generate(torch.tensor([ids], device=self.engine.device),
                                           states=[use_state] if use_state is not None else None,
                                           **sampling.generate_kwargs(tok))
            text = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
            if name == "adapter" and use_state is None:
                text = "(no adapter yet) " + text
            answers[name] = Answer(text, len(ids), time.perf_counter() - started)
        # the answers show what the user's history holds: who looked is on record
        self.storage.record_audit(actor.id, "probe", user_id, {"question": question[:200]})
        return answers

    def admin_rebuild(self, actor_id: int | None, user_id: int) -> str:
        """Queue a rebuild of the user's adapter from their history; the user's name."""
        actor, user = self._admin(actor_id), self._target(user_id)
        self.storage.request_rebuild(user.id, actor_id=actor.id)
        self._drop_state(user.id)
        self.storage.queue_job(user.id)
        return user.username

    def admin_reset(self, actor_id: int | None, user_id: int) -> str:
        """Delete the user's messages and adapters, keeping the account; the user's name."""
        actor, user = self._admin(actor_id), self._target(user_id)
        self.storage.reset_memory(user.id, actor_id=actor.id)
        self._drop_state(user.id)
        self.downloads.remove_user(user.id)
        return user.username

    def admin_export_peft(self, actor_id: int | None, user_id: int, address: str | None = None) -> Download:
        """A link for the admin to the user's adapter as a PEFT LoRA (zip)."""
        actor, user = self._admin(actor_id), self._target(user_id)
        self._costly(actor.id)
        _, state = self._current_state(user.id)
        if state is None:
            raise AppError(f"{user.username} has no usable adapter yet")

        def write(archive: Path) -> None:
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
                self._zip_peft(z, state, "")

        download = self.downloads.add(actor.id, f"adapter-{user.username}-peft.zip", write, address,
                                      subject_id=user.id)
        self.storage.record_audit(actor.id, "export_peft", user.id, {"tokens": state.tokens})
        return download

    def admin_delete_user(self, actor_id: int | None, user_id: int) -> str:
        """Delete the account and all its data; the user's name."""
        actor, user = self._admin(actor_id), self._target(user_id)
        if user.id == actor.id:
            raise AppError("Admins cannot delete their own account here")
        self.storage.delete_user(user.id, actor_id=actor.id)
        self._drop_state(user.id)
        self.downloads.remove_user(user.id)
        return user.username

    def admin_set_signup(self, actor_id: int | None, open_: bool) -> None:
        actor = self._admin(actor_id)
        self.signup_open = bool(open_)
        self.storage.record_audit(actor.id, "set_signup", None, {"open": self.signup_open})

    def admin_audit(self, actor_id: int | None, limit: int = 100) -> list[dict]:
        self._admin(actor_id)
        names = {u.id: u.username for u in self.storage.list_users()}
        return [{"time": e.created_at.isoformat(timespec="seconds"), "actor": names.get(e.actor_id, e.actor_id),
                 "action": e.action, "user": names.get(e.target_user_id, e.target_user_id),
                 "details": json.dumps(e.details)} for e in self.storage.list_audit(limit=limit)]


class _StopWhenSet(StoppingCriteria):
    """Ends decoding at the next token once the event is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")


def _whole_sentences(text: str) -> str:
    """A reply cut off by the length cap, up to its last whole sentence; when that would drop most
    of it, the reply as it is with an ellipsis."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 3:
        return text[:ends[-1]]
    return text + "…"


def _chosen_id(field: str, value: object) -> int | None:
    """A row id chosen on the page (a dropdown's custom value can be anything); None if it is none."""
    try:
        return validation.count(field, int(str(value)))
    except (TypeError, ValueError):  # storage's ValidationError is a ValueError
        return None


def _printable(text: str) -> str:
    """Model output as storable text: no control characters but newline and tab, no lone surrogates
    (a small or untrained model can emit anything)."""
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    return text.encode("utf-8", "replace").decode("utf-8")


__all__ = ["Answer", "ChatService", "ReplyStats"]
