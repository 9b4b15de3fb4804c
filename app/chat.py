"""Chat: a user's history, and one turn: their message stored, the reply streamed and stored.

A turn is two database transactions (storage's begin_turn and finish_turn) around the decoding,
which runs on the inference loop (adapter_core.serving.scheduler) together with everyone else's replies.
One user's turns run one at a time (a message sent while the previous one is being answered is
refused, or with ReplyOptions.queue waits for it), so that a reply always sees the user's previous
turn in its prompt or their adapter.
The web page and the OpenAI-compatible API (app/openai_api.py) both take turns here; the API may
say more about how to answer one (ReplyOptions).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime

from adapter_core import AdapterState, GenerativeAdapterModel
from adapter_core.data.conversation import SYSTEM_PROMPT, Turn, prompt_ids
from adapter_core.serving.decoding import Reply, ReplyRequest, count_tokens, fit_prompt
from adapter_core.serving.sampling import SamplingConfig
from adapter_core.serving.scheduler import InferenceLoop, ReplyStream
from storage import LeaseLost, NotFound, Storage, ValidationError, validation
from storage.models import Message

from .access import Access
from .errors import AccessDenied, Busy, InvalidInput, ReplyNotSaved, ServerStopping, TooLong
from .leases import renewing
from .memory import Memory


@dataclass(frozen=True)
class HistoryMessage:
    id: int
    role: str
    """'user' or 'assistant'."""
    text: str
    absorbed: bool
    """In the user's adapter already (else still in the prompts, waiting for compression)."""
    created_at: datetime

    @classmethod
    def of(cls, message: Message) -> HistoryMessage:
        return cls(message.id, message.role, message.text, message.snapshot_id is not None, message.created_at)

    def as_json(self) -> dict:
        """As the data export writes it."""
        return {"id": self.id, "role": self.role, "text": self.text, "absorbed": self.absorbed,
                "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class ReplyStats:
    prompt_tokens: int
    pending_turns: int
    """Turns in the prompt besides the adapter (the new message included): the stored turns it
    does not hold yet, or the API client's own earlier turns."""
    adapter_version: int | None
    first_token_s: float
    total_s: float
    reply_tokens: int
    """Tokens of the reply as stored."""
    generated_tokens: int
    """Tokens decoded: what the reply cost (the stored reply may be shorter, see _stored_answer)."""
    finish: str
    """Why the reply ended: 'end' (its end of turn), 'length' (the token cap) or 'stop' (a stop
    sequence of ReplyOptions)."""

    def line(self) -> str:
        adapter = f"adapter v{self.adapter_version}" if self.adapter_version else "no adapter yet"
        turns = "turn" if self.pending_turns == 1 else "turns"
        return (f"{self.prompt_tokens} prompt tokens ({self.pending_turns} {turns} not yet in memory) · {adapter} · "
                f"first token {self.first_token_s:.2f} s · {self.reply_tokens} tokens in {self.total_s:.2f} s")


@dataclass(frozen=True)
class TurnOpened:
    """The first item of a reply's stream when asked for: the user's history as stored, the new
    message last (read in the turn's first transaction, so a page need not read it again)."""

    history: tuple[HistoryMessage, ...]


@dataclass(frozen=True)
class ReplyStarted:
    """Yielded when asked for (announce), once the reply is submitted and before any of its text:
    what answers it, for a caller that must say so before the text (the API's response header)."""

    adapter_version: int | None
    """The user's adapter version that answers; None: the base model (no usable adapter)."""
    prompt_tokens: int


@dataclass(frozen=True)
class ReplyOptions:
    """How to answer one turn, for a caller that says more than the message (the API). The web
    page says none of it: its turns use the stored turns the adapter lacks, the app's system
    text and Chat.sampling."""

    context: tuple[Turn, ...] | None = None
    """The client's own earlier turns of its conversation, as the prompt's recent turns (the
    earliest dropped until it fits, as for stored ones). They replace the stored turns that the
    adapter lacks, which would mostly repeat them: a client that sends its conversation has sent
    those turns before. None: the stored turns, as on the page."""
    instructions: str | None = None
    """The client's system text, added after the app's own (the one the generator was trained with)."""
    sampling: SamplingConfig | None = None
    """None: Chat.sampling."""
    seed: int | None = None
    """Of the reply's sampling (None: a random one)."""
    stop: tuple[str, ...] = ()
    """The reply ends before the first of these it writes; none of it is streamed or stored."""
    store: bool = True
    """False: answered as a stored turn would be (the same adapter, the same pending turns unless
    `context` replaces them, the same limits and one turn at a time), but neither the message nor
    the reply is stored, so memory never absorbs them (a client's background requests: titles,
    tags, follow-up suggestions). Nothing is written (but the one-time report of a damaged
    adapter file, as for any turn)."""
    queue: bool = False
    """True: sent while the user's previous turn is being answered, this one waits behind it (at
    most AppSettings.turn_queue_seconds, behind at most turn_queue_depth others) instead of being
    refused at once: an API client may send a conversation's requests together, as the `openai`
    package's retries do. The page's turns are refused, and the page says why."""


@dataclass(frozen=True)
class FinishedReply:
    """The last item of a reply's stream: the reply as stored (what the history shows from now on)."""

    text: str
    stats: ReplyStats
    stored: bool = True
    """False for a turn of ReplyOptions.store False: the text was not stored."""


class ReplyFailed(RuntimeError):
    """Decoding ended without a reply (an error in the inference loop): a fault."""


STILL_ANSWERED = "Your previous message is still being answered; please send this one when it is done"
"""Why a turn sent while the same user's previous one runs (here or on another replica) is refused."""
TAKEN_OVER = ("This reply could not be saved: another of your messages was answered meanwhile. "
              "Your message is kept; please ask again")
"""Why a reply stops unsaved on a web replica that stalled past its turn's lease, which another took."""


class OneTurnAtATime:
    """Each user's turns run one at a time: a turn's reply must see the previous turn. A turn sent
    while another runs is refused (Busy), or waits in that user's line, first come first served,
    when the caller allows it a wait and the line is not full. With `shared` (web replicas on one
    database), a turn also holds the user's lease there, so that no other replica runs one meanwhile."""

    def __init__(self, shared: SharedTurns | None = None) -> None:
        self.shared = shared
        self._changed = threading.Condition()
        self._running: set[int] = set()
        self._waiting: dict[int, deque[object]] = {}  # user id -> tickets of their waiting turns, in order

    @contextlib.contextmanager
    def turn_of(self, user_id: int, wait_s: float, depth: int) -> Iterator[threading.Event]:
        """The block is the user's running turn (Busy: it could not start within wait_s); the event
        it gets is set if another replica takes the turn over meanwhile (never, without `shared`)."""
        asked = time.monotonic()
        with self._changed:
            if user_id in self._running or user_id in self._waiting:
                self._wait(user_id, wait_s, depth)
            self._running.add(user_id)
        try:
            if self.shared is None:
                yield threading.Event()
            else:
                with self.shared.held(user_id, wait_s - (time.monotonic() - asked)) as lost:
                    yield lost
        finally:
            with self._changed:
                self._running.discard(user_id)
                self._changed.notify_all()

    def _wait(self, user_id: int, wait_s: float, depth: int) -> None:
        line = self._waiting.setdefault(user_id, deque())
        if wait_s <= 0 or len(line) >= depth:
            if not line:
                del self._waiting[user_id]
            raise Busy(STILL_ANSWERED)
        ticket = object()
        line.append(ticket)
        try:
            started = self._changed.wait_for(lambda: user_id not in self._running and line[0] is ticket, wait_s)
        finally:
            line.remove(ticket)
            if not line:
                del self._waiting[user_id]
            self._changed.notify_all()  # the next in line may be first now
        if not started:
            raise Busy(f"Your previous message is still being answered after {wait_s:g} s; "
                       "please send this one when it is done")


SHARED_TURN_POLL_S = 0.2
"""How often a turn waiting for another replica's turn of the same user looks again."""


class SharedTurns:
    """A user's running turn, held in the database for web replicas sharing it (--role web): a
    lease renewed while the reply runs (app/leases.py), so a replica that dies mid-reply locks its
    user out for one lease (StorageSettings.turn_lease_s) at most."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.holder = secrets.token_hex(16)
        """This process, as the lease names it."""

    @contextlib.contextmanager
    def held(self, user_id: int, wait_s: float) -> Iterator[threading.Event]:
        """The block holds the user's turn (Busy: another replica held it for longer than wait_s);
        the event it gets is set once a renewal finds the lease lost to another replica."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while not self._take(user_id):
            if time.monotonic() >= deadline:
                raise Busy(STILL_ANSWERED)
            time.sleep(SHARED_TURN_POLL_S)
        try:
            with renewing(lambda: self.storage.renew_turn(user_id, self.holder), self.storage.settings.turn_lease_s,
                          f"user {user_id}'s turn") as lost:
                yield lost
        finally:
            self.storage.end_turn(user_id, self.holder)

    def _take(self, user_id: int) -> bool:
        try:
            return self.storage.take_turn(user_id, self.holder)
        except NotFound:
            raise AccessDenied("Please log in") from None


class Chat:
    def __init__(self, access: Access, engine: GenerativeAdapterModel, loop: InferenceLoop, memory: Memory) -> None:
        self.access, self.engine, self.loop, self.memory = access, engine, loop, memory
        self.storage, self.settings, self.limits = access.storage, access.settings, access.limits
        tokenizer = engine.tokenizer
        self.prompt_room = engine.base_model.config.max_position_embeddings - self.settings.max_new_tokens
        """Prompt tokens the model can take and still write a whole reply."""
        self._framing = len(prompt_ids(tokenizer, ""))
        """Tokens of a prompt besides its turns and message: the system text and the chat template."""
        self.sampling = SamplingConfig(max_new_tokens=self.settings.max_new_tokens)
        """How replies are decoded (the benchmark sets replies of one length here)."""
        self._turns = OneTurnAtATime(SharedTurns(self.storage) if self.settings.role == "web" else None)

    def history(self, user_id: object) -> tuple[HistoryMessage, ...]:
        user = self.access.user(user_id)
        return tuple(HistoryMessage.of(m) for m in self.storage.history(user.id))

    @property
    def prompt_limit(self) -> int:
        """Most tokens of a prompt: what the model can take, and what one request may cost (a long
        prompt is prefilled in slices, so it holds nobody else up, but it costs its user the time)."""
        return min(self.prompt_room, self.settings.max_prompt_tokens)

    def check_message(self, text: object, field: str = "text") -> tuple[str, int]:
        """The message as it will be stored, and its tokens; InvalidInput if it cannot be sent."""
        if isinstance(text, str) and len(text) > self.settings.max_message_chars:  # refused unread
            raise TooLong(field, f"is too long: {len(text):,} characters, at most "
                                 f"{self.settings.max_message_chars:,}")
        try:
            text = validation.message_text(text, self.storage.settings)
        except ValidationError as e:
            raise InvalidInput(field, e.reason) from e
        tokens = count_tokens(self.engine.tokenizer, text)
        room = self.prompt_limit - self._framing
        if tokens > room:
            raise TooLong(field, f"is too long: {tokens:,} tokens, at most {room:,}")
        return text, tokens

    def reply(self, user_id: object, text: str, *, with_history: bool = False, announce: bool = False,
              options: ReplyOptions | None = None) -> Iterator[TurnOpened | ReplyStarted | str | FinishedReply]:
        """Store the message, stream the reply (pieces of text), store it, then yield a FinishedReply;
        with_history, first a TurnOpened with the stored history; with announce, a ReplyStarted
        before the reply's text.

        One turn of a user runs at a time, whether it comes from the page or the API: a message
        sent while the previous one is still being answered (its reply could not see that turn
        yet) is refused at once (Busy), or with options.queue waits behind it (OneTurnAtATime). Three database transactions at most: the turn's
        start, its end, and (once, when the adapter's file turns out to be damaged) the report of
        that. Closing the iterator (a reader that went away) cancels the decoding. With
        options.store False nothing is written (ReplyOptions.store)."""
        options = options or ReplyOptions()
        if with_history and not options.store:
            raise ValueError("with_history shows the stored history: a turn that is not stored has none to show")
        user_id = self.access.user_id(user_id)
        text, tokens = self.check_message(text)
        system, framing = self._system(options.instructions, tokens)
        wait_s = self.settings.turn_queue_seconds if options.queue else 0.0
        with self._turns.turn_of(user_id, wait_s, self.settings.turn_queue_depth) as taken_over:
            if not self.loop.running:  # e.g. a turn that waited behind one the shutdown stopped: store nothing
                raise ServerStopping()
            self.limits.hit(self.settings.messages_per_user, "message", str(user_id),
                            what="You are sending messages faster than the model can answer")
            if options.store:
                try:
                    turn = self.storage.begin_turn(user_id, text, tokens, with_history=with_history)
                except NotFound:
                    raise AccessDenied("Please log in") from None
                if with_history:
                    yield TurnOpened(tuple(HistoryMessage.of(m) for m in turn.history))
                state, pending = self.memory.answer_context(turn)
                version = turn.snapshot.version if state is not None else None
            else:
                state, version, pending = self._unstored_context(user_id, with_pending=options.context is None)
            recent = list(options.context) if options.context is not None else [Turn(m.role, m.text) for m in pending]
            budget = min(self.prompt_limit, framing + tokens + self.settings.recent_token_budget)
            ids, kept = fit_prompt(self.engine.tokenizer, text, recent, budget, system)
            stream = self.loop.submit(ReplyRequest(prompt=tuple(ids), state=state,
                                                   sampling=options.sampling or self.sampling, seed=options.seed))
            try:
                if announce:
                    yield ReplyStarted(version, len(ids))
                written, stopped = yield from _streamed(stream, options.stop, taken_over)
            except ReplyNotSaved:
                self.access.user(user_id)  # an account deleted meanwhile took its lease along: "Please log in"
                raise
            finally:  # a reader that went away (logged out, disconnected) stops the decoding too
                stream.cancel()
            reply = stream.result()  # after a stop sequence: cancelled, at the next decode step
            if stopped:
                answer, finish = written.strip() or "…", "stop"
            else:
                answer, finish = _stored_answer(_printable(reply.text), reply), reply.finish
            answer_tokens = count_tokens(self.engine.tokenizer, answer)
            if options.store:
                holder = self._turns.shared.holder if self._turns.shared is not None else None
                try:
                    self.storage.finish_turn(user_id, turn.message.conversation_id, answer, answer_tokens,
                                             compress_every=self.settings.compress_every, turn_holder=holder)
                except NotFound:  # the account was deleted while its reply was written
                    raise AccessDenied("Please log in") from None
                except LeaseLost:  # this replica stalled past the turn's lease and another took the turn
                    raise ReplyNotSaved(TAKEN_OVER) from None
        first_token_s = reply.first_token_s if reply.first_token_s is not None else reply.total_s
        yield FinishedReply(answer, ReplyStats(
            reply.prompt_tokens, len(kept) + 1, version, first_token_s, reply.total_s, answer_tokens,
            len(reply.tokens), finish), stored=options.store)

    def _unstored_context(self, user_id: int, *, with_pending: bool) -> tuple[AdapterState | None, int | None,
                                                                              tuple[Message, ...]]:
        """What a turn that is not stored is answered with, read without writing anything: the
        user's usable adapter state (None: the base model), its version, and (with_pending) the
        stored messages it does not hold, as begin_turn and Memory.answer_context find them. Up to
        three reading transactions rather than begin_turn's one: the state and its cursor come
        from the same snapshot row, so a compression landing in between only leaves this turn on
        the previous adapter, and the user's own turns cannot land (one at a time)."""
        user = self.access.user(user_id)
        snapshot, state = self.memory.usable_state(user)
        if state is None:
            return None, None, tuple(self.storage.messages_after(user.id, 0)) if with_pending else ()
        pending = tuple(self.storage.messages_after(user.id, snapshot.cursor)) if with_pending else ()
        return state, snapshot.version, pending

    def _system(self, instructions: str | None, tokens: int) -> tuple[str, int]:
        """The prompt's system text and its framing tokens (all but the turns and the message);
        TooLong when the client's instructions and the message leave the model no room."""
        if instructions is None:
            return SYSTEM_PROMPT, self._framing
        system = f"{SYSTEM_PROMPT}\n\n{instructions}"
        framing = len(prompt_ids(self.engine.tokenizer, "", system=system))
        if framing + tokens > self.prompt_limit:
            raise TooLong("instructions", f"and the message are too long together: "
                                          f"{framing + tokens:,} tokens, at most {self.prompt_limit:,}")
        return system, framing


def _streamed(stream: ReplyStream, stop: tuple[str, ...],
              taken_over: threading.Event) -> Generator[str, None, tuple[str, bool]]:
    """Yield the reply's printable text as it comes; returns (all of it, whether a stop sequence
    ended it). With stop sequences, what may be the start of one is held back until the text
    after it shows whether it is; the text ends before the first one found. ReplyNotSaved once the
    turn is taken over by another replica: a reply that cannot be stored stops rather than runs on."""
    text, shown = "", 0
    for piece in map(_printable, stream):
        if taken_over.is_set():
            raise ReplyNotSaved(TAKEN_OVER)
        if not piece:
            continue
        text += piece
        safe = len(text)
        if stop:
            # a stop sequence starts at `shown` or later: what came before it was held back
            found = [i for i in (text.find(s, shown) for s in stop) if i >= 0]
            if found:
                text = text[:min(found)]
                if len(text) > shown:
                    yield text[shown:]
                return text, True
            safe -= _stop_start(text, stop, shown)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    if len(text) > shown:
        yield text[shown:]
    return text, False


def _stop_start(text: str, stop: tuple[str, ...], start: int) -> int:
    """Length of the longest end of text (after `start`) that begins one of the stop sequences."""
    longest = 0
    for sequence in stop:
        for size in range(min(len(sequence) - 1, len(text) - start), longest, -1):
            if text.endswith(sequence[:size]):
                longest = size
                break
    return longest


def _stored_answer(streamed: str, reply: Reply) -> str:
    """The reply as it is stored: its text, cut at its last whole sentence when it ran to
    the length cap, never empty; ServerStopping when the server stopped it (the reply is not
    stored; the message stays, without a reply, as when a client goes away mid-reply),
    ReplyFailed when decoding ended without a reply."""
    if reply.finish == "stopped":
        raise ServerStopping()
    if reply.finish not in ("end", "length"):
        raise ReplyFailed(f"decoding ended as {reply.finish!r}: no reply to store")
    answer = streamed.strip()
    if reply.finish == "length":
        answer = _whole_sentences(answer)
    return answer or "…"


_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")


def _whole_sentences(text: str) -> str:
    """A reply cut off by the length cap, up to its last whole sentence; when that would drop most
    of it, the reply as it is with an ellipsis."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 3:
        return text[:ends[-1]]
    return text + "…"


def _printable(text: str) -> str:
    """Model output as storable text: no control characters but newline and tab, no lone surrogates
    (a small or untrained model can emit anything)."""
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    return text.encode("utf-8", "replace").decode("utf-8")
