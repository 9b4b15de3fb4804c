"""Chat: a user's history, and one turn: their message stored, the reply streamed and stored.

A turn is two database transactions (storage's begin_turn and finish_turn) around the decoding,
which runs on the inference loop (adapter_core.scheduler) together with everyone else's replies.
One user's turns run one at a time (a message sent while the previous one is being answered is
refused), so that a reply always sees the user's previous turn in its prompt or their adapter.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from adapter_core import GenerativeAdapterModel
from adapter_core.data.conversation import Turn, prompt_ids
from adapter_core.decoding import Reply, ReplyRequest, count_tokens, fit_prompt
from adapter_core.sampling import SamplingConfig
from adapter_core.scheduler import InferenceLoop
from storage import NotFound, ValidationError, validation
from storage.models import Message

from .access import Access, logged_in_id
from .errors import AccessDenied, AppError, InvalidInput
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


@dataclass(frozen=True)
class TurnOpened:
    """The first item of a reply's stream when asked for: the user's history as stored, the new
    message last (read in the turn's first transaction, so a page need not read it again)."""

    history: tuple[HistoryMessage, ...]


@dataclass(frozen=True)
class FinishedReply:
    """The last item of a reply's stream: the reply as stored (what the history shows from now on)."""

    text: str
    stats: ReplyStats


class ReplyFailed(RuntimeError):
    """Decoding ended without a reply (an error in the inference loop, or the loop stopped): a fault."""


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
        self._answering: set[int] = set()  # users whose turn is running
        self._answering_lock = threading.Lock()

    def history(self, user_id: object) -> tuple[HistoryMessage, ...]:
        user = self.access.user(user_id)
        return tuple(HistoryMessage.of(m) for m in self.storage.history(user.id))

    def check_message(self, text: object, field: str = "text") -> tuple[str, int]:
        """The message as it will be stored, and its tokens; InvalidInput if it cannot be sent."""
        if isinstance(text, str) and len(text) > self.settings.max_message_chars:  # refused unread
            raise InvalidInput(field, f"is too long: {len(text):,} characters, at most "
                                      f"{self.settings.max_message_chars:,}")
        try:
            text = validation.message_text(text, self.storage.settings)
        except ValidationError as e:
            raise InvalidInput(field, e.reason) from e
        tokens = count_tokens(self.engine.tokenizer, text)
        room = self.prompt_room - self._framing
        if tokens > room:
            raise InvalidInput(field, f"is too long for the model: {tokens:,} tokens, at most {room:,}")
        return text, tokens

    def reply(self, user_id: object, text: str, *,
              with_history: bool = False) -> Iterator[TurnOpened | str | FinishedReply]:
        """Store the message, stream the reply (pieces of text), store it, then yield a FinishedReply;
        with_history, first a TurnOpened with the stored history.

        One turn of a user runs at a time: a message sent while the previous one is still being
        answered is refused at once (its reply could not see the previous turn yet). Three
        database transactions at most: the turn's start, its end, and (once, when the adapter's
        file turns out to be damaged) the report of that."""
        user_id = logged_in_id(user_id)
        text, tokens = self.check_message(text)
        with self._answering_lock:
            if user_id in self._answering:
                raise AppError("Your previous message is still being answered; please send this one when it is done")
            self._answering.add(user_id)
        try:
            self.limits.hit(self.settings.messages_per_user, "message", str(user_id),
                            what="You are sending messages faster than the model can answer")
            try:
                turn = self.storage.begin_turn(user_id, text, tokens, with_history=with_history)
            except NotFound:
                raise AccessDenied("Please log in") from None
            if with_history:
                yield TurnOpened(tuple(HistoryMessage.of(m) for m in turn.history))
            state, pending = self.memory.answer_context(turn)
            budget = min(self.prompt_room, self._framing + tokens + self.settings.recent_token_budget)
            ids, kept = fit_prompt(self.engine.tokenizer, text, [Turn(m.role, m.text) for m in pending], budget)
            stream = self.loop.submit(ReplyRequest(prompt=tuple(ids), state=state, sampling=self.sampling))
            try:
                for piece in map(_printable, stream):
                    if piece:
                        yield piece
            finally:  # a reader that went away (logged out, disconnected) stops the decoding too
                stream.cancel()
            reply = stream.result()
            answer = _stored_answer(_printable(reply.text), reply)
            end = self.storage.finish_turn(user_id, turn.message.conversation_id, answer,
                                           count_tokens(self.engine.tokenizer, answer),
                                           compress_every=self.settings.compress_every)
        finally:
            with self._answering_lock:
                self._answering.discard(user_id)
        first_token_s = reply.first_token_s if reply.first_token_s is not None else reply.total_s
        yield FinishedReply(answer, ReplyStats(
            reply.prompt_tokens, len(kept) + 1, turn.snapshot.version if state is not None else None,
            first_token_s, reply.total_s, end.message.token_count))


def _stored_answer(streamed: str, reply: Reply) -> str:
    """The reply as it is stored: its text, cut at its last whole sentence when it ran to
    the length cap, never empty; ReplyFailed when decoding ended without a reply."""
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
