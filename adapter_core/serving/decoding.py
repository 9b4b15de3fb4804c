"""Replying: from prompts and users' adapter states to replies, many users in one batch.

    ReplyRequest (prompt ids, state or None, sampling)
        │ join: the newcomers' prompts in one prefill (left padded, each row its own adapter),
        │       their KV cache merged into the running batch's (left padded to one width)
        ▼
    DecodeBatch ── step: every row feeds its last token, picks its next ──┐  (the lean step of
        │                                                              ◄──┘   adapter_core.serving.lean_decoder
        │                                                                     on the CPU, else the
        │                                                                     transformers model)
        │ leave: rows that ended (end of turn, length cap, cancelled) are cut out of the cache
        ▼
    Reply (tokens, text, why it ended, timings)

Rows join and leave between steps, so a batch serves replies that started at different times
(continuous batching); adapter_core.serving.scheduler runs one such batch on one thread for the app.
`reply()` decodes a fixed list of requests (evaluation, scripts). `fit_prompt` is the one rule
for prompts that would not fit: drop the earliest recent turns. Nothing else calls the model's
`generate`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..data.conversation import SYSTEM_PROMPT, Turn, left_pad, prompt_ids
from .kv_cache import KVCache, pad_left
from .lean_decoder import lean_decoder
from ..memory.model import GenerativeAdapterModel, RowAdapters, UserAdapter
from .sampling import SamplingConfig, TokenPicker, choose_tokens, end_of_turn_ids
from ..memory.state import AdapterState

log = logging.getLogger(__name__)

FINISHES = ("end", "length", "cancelled", "failed", "stopped")
"""Why a reply ended: its end of turn, the length cap, its reader went away, an error, or the
inference loop stopped (the server shuts down)."""


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of a text as stored and absorbed (no special tokens added)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer, question: str, recent: Sequence[Turn], max_tokens: int,
               system: str | None = SYSTEM_PROMPT) -> tuple[list[int], list[Turn]]:
    """The prompt's ids and the recent turns it kept: the earliest turns are dropped until the
    prompt has at most max_tokens (the question itself is never cut; check its size before)."""
    bare = len(prompt_ids(tokenizer, question, (), system))
    recent = newest_within(tokenizer, recent, max_tokens - bare)
    ids = prompt_ids(tokenizer, question, recent, system)
    if len(ids) <= max_tokens:
        return ids, recent
    dropped = fewest_dropped(len(recent), lambda n: len(prompt_ids(tokenizer, question, recent[n:], system)) <= max_tokens)
    return prompt_ids(tokenizer, question, recent[dropped:], system), recent[dropped:]


def newest_within(tokenizer, turns: Sequence[Turn], tokens: int) -> list[Turn]:
    """The newest turns whose texts hold at most `tokens` tokens together (the chat template adds
    more, so fit_prompt may drop more). One batched tokenization: a request with thousands of
    earlier turns costs milliseconds here, where each of fit_prompt's tries renders the chat
    template over every turn it is given (5,800 tiny turns held a request thread for 20 s)."""
    turns = list(turns)
    if not turns or tokens <= 0:
        return []
    counts = [len(ids) for ids in tokenizer([t.text for t in turns], add_special_tokens=False)["input_ids"]]
    kept, total = 0, 0
    for count in reversed(counts):
        if total + count > tokens:
            break
        kept, total = kept + 1, total + count
    return turns[len(turns) - kept:]


def fewest_dropped(count: int, fits: Callable[[int], bool]) -> int:
    """The fewest of `count` earliest turns to drop so that fits(dropped) holds, by bisection,
    when dropping none does not fit and dropping all does."""
    low, high = 1, count
    while low < high:
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid + 1
    return low


@dataclass(frozen=True)
class ReplyRequest:
    prompt: tuple[int, ...]
    """Token ids of the whole prompt (chat template applied, see fit_prompt)."""
    state: AdapterState | None = None
    """The user's adapter state; None answers with the base model."""
    sampling: SamplingConfig = SamplingConfig()
    """How tokens are chosen and when the reply stops."""
    seed: int | None = None
    """Seed of this reply's sampling (None: a fresh random one); greedy replies ignore it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        if not self.prompt:
            raise ValueError("a reply needs a prompt of at least one token")


@dataclass(frozen=True)
class Reply:
    tokens: tuple[int, ...]
    """The reply's token ids, without the end-of-turn token."""
    text: str
    """The tokens decoded, special tokens skipped, stripped."""
    finish: str
    """Why it ended, one of FINISHES."""
    prompt_tokens: int
    first_token_s: float | None
    """Seconds from the request to its first token (None: none came)."""
    total_s: float
    """Seconds from the request to its end."""

    def __post_init__(self) -> None:
        if self.finish not in FINISHES:
            raise ValueError(f"finish must be one of {FINISHES}, got {self.finish!r}")


@dataclass(eq=False)
class Row:
    """One reply being decoded: what it was asked, what it has chosen so far."""

    request: ReplyRequest
    adapter: UserAdapter | None  # the user's adapter (GenerativeAdapterModel.user_adapter); None: base model
    picker: TokenPicker
    tokens: list[int] = field(default_factory=list)
    last: int | None = None  # the chosen token not yet fed to the model
    position: int = 0  # position id of `last`
    finish: str | None = None  # set when the reply has ended
    first_token_at: float | None = None  # perf_counter() when its first token was chosen
    reported: int = 0  # tokens already handed on (see news)

    def news(self) -> list[int]:
        """The tokens chosen since the last call."""
        new = self.tokens[self.reported:]
        self.reported = len(self.tokens)
        return new


PREFILL_CHUNK_TOKENS = 256
"""Prompt columns run in one forward of a prefill: big enough to keep the products efficient,
small enough that one decoder layer of a chunk stays short at a long context (see prefill)."""

PrefilledGroup = tuple[list[Row], KVCache, torch.Tensor, RowAdapters | None]
"""Rows prefilled together: the rows, their KV cache (N, H, T, D) per layer, mask (N, T), adapters."""


@dataclass(frozen=True)
class Prefilled:
    """Replies whose prompts ran (DecodeBatch.prefill), ready to join a batch (DecodeBatch.add)."""

    rows: list[Row]
    """In the order of the requests."""
    groups: list[PrefilledGroup]


class DecodeBatch:
    """The rows being decoded together: their KV cache, attention mask and adapters.

    The cache is left padded: column c of every row is the same cache slot, a row's padding is
    masked out, and each row counts its own positions. Not thread-safe: one thread drives it.
    """

    def __init__(self, engine: GenerativeAdapterModel, lean: bool = True):
        """lean: decode with adapter_core.serving.lean_decoder where it applies (False: always through the
        transformers model, the reference the lean step is tested and benchmarked against)."""
        self.engine = engine
        self.lean = lean_decoder(engine) if lean else None
        tok = engine.tokenizer  # None for engines driven by token ids only (tests): no end of turn then
        self.end_ids = set(end_of_turn_ids(tok)) if tok is not None else set()
        pad = getattr(tok, "pad_token_id", None)
        self.pad_id = pad if pad is not None else min(self.end_ids, default=0)
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 for real tokens
        self.adapters: RowAdapters | None = None  # what engine.applying sets for these rows

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, requests: Sequence[ReplyRequest]) -> list[Row]:
        """Prefill the requests and add them to the batch, each with its first token chosen; the
        rows in the order of the requests. If this raises, the batch is as it was."""
        return self.add(self.prefill(requests))

    @torch.inference_mode()
    def prefill(self, requests: Sequence[ReplyRequest], pause: Callable[[], None] | None = None) -> Prefilled:
        """Run the requests' prompts, first tokens chosen, without adding them to the batch yet (see add).

        Prompts of similar length are prefilled together; a short prompt is not padded to a long
        one's length (left padding is computed like real tokens, and prefill is most of a new
        reply's wait). A prompt runs in chunks of PREFILL_CHUNK_TOKENS columns, each extending the
        cache; pause, if given, is called before each decoder layer of each chunk (the inference
        loop decodes other replies there, so a long prompt never holds them up: a chunk's layer at
        an 8K context is tens of milliseconds, where the whole prompt is a minute)."""
        rows = self._rows(requests)
        return Prefilled(rows, [self._prefill(group, pause) for group in _by_length(rows)])

    def add(self, prefilled: Prefilled) -> list[Row]:
        """Add prefilled rows to the batch (they join the next step); their rows, in request order."""
        for group, cache, mask, adapters in prefilled.groups:
            self._merge(group, cache, mask, adapters)
        return prefilled.rows

    @torch.inference_mode()
    def join_prefilled(self, requests: Sequence[ReplyRequest], cache: DynamicCache, mask: torch.Tensor,
                       logits: torch.Tensor) -> list[Row]:
        """Add requests whose prompts the caller ran itself, as one left-padded batch: `mask` (N, T)
        and `cache` hold exactly those T columns, `logits` (N, V) are at each prompt's last token.
        For a caller that needs that forward for more than decoding (the evaluator scores the gold
        answer in the same pass). The rows in the order of the requests, first tokens chosen."""
        rows = self._rows(requests)
        adapters = self.engine.row_adapters([row.adapter for row in rows])
        self._merge(*self._start(rows, cache, mask.to(self.engine.device), logits, adapters))
        return rows

    def _rows(self, requests: Sequence[ReplyRequest]) -> list[Row]:
        engine = self.engine
        return [Row(r, None if r.state is None else engine.user_adapter(r.state),
                    TokenPicker(r.sampling, r.prompt, r.seed)) for r in requests]

    def _prefill(self, rows: list[Row], pause: Callable[[], None] | None = None) -> PrefilledGroup:
        """The rows' prompts, chunk by chunk into one cache: their KV cache, mask and adapters,
        first tokens chosen. A start every prompt shares under one adapter runs once (see
        SHARED_PREFIX_TOKENS): its cache is copied to each row, and the rest follows left padded,
        so that a row's padding sits between the shared start and its own tokens (masked out)."""
        engine = self.engine
        shared = _shared_prefix(rows)
        cache = DynamicCache()
        if shared:
            prefix = torch.tensor([rows[0].request.prompt[:shared]], device=engine.device)  # (1, P)
            with engine.applying(engine.row_adapters([rows[0].adapter]), pause):
                _run_chunks(engine, prefix, torch.ones_like(prefix), cache)
            cache.batch_repeat_interleave(len(rows))  # (N, H, P, D) per layer
        ids, mask = left_pad([row.request.prompt[shared:] for row in rows], self.pad_id)  # (N, T - P) each
        ids, mask = ids.to(engine.device), torch.cat([mask.new_ones(len(rows), shared), mask], 1).to(engine.device)  # mask (N, T)
        adapters = engine.row_adapters([row.adapter for row in rows])
        with engine.applying(adapters, pause):
            logits = _run_chunks(engine, ids, mask, cache)
        return self._start(rows, cache, mask, logits, adapters)

    def _start(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor,
               adapters: RowAdapters | None) -> PrefilledGroup:
        """Rows whose prompts were run: first tokens chosen; what _merge takes."""
        for row in rows:
            row.position = len(row.request.prompt)
        self._choose(rows, logits)
        return rows, KVCache.from_dynamic(cache), mask, adapters

    @torch.inference_mode()
    def step(self) -> None:
        """Every row feeds its last chosen token and chooses the next (rows that ended must have left)."""
        engine = self.engine
        if any(row.finish for row in self.rows):
            raise RuntimeError("rows that ended must leave the batch before the next step")
        ids = torch.tensor([row.last for row in self.rows], device=engine.device)  # (B,)
        positions = torch.tensor([row.position for row in self.rows], device=engine.device)  # (B,)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # (B, T+1)
        if self.lean is not None and self.lean.applies(self.mask.shape[1]):
            logits = self.lean.step(ids, positions, self.cache, self.mask, self.adapters)  # (B, V)
        else:
            cache = self.cache.as_dynamic()
            with engine.applying(self.adapters):
                logits = engine.base_model(input_ids=ids[:, None], attention_mask=self.mask,
                                           position_ids=positions[:, None], cache=cache,
                                           use_cache=True).logits[:, -1]  # (B, V)
            self.cache.append_from(cache)
        for row in self.rows:
            row.position += 1
        self._choose(self.rows, logits)

    @torch.inference_mode()
    def leave(self, rows: Sequence[Row]) -> None:
        """Cut rows out of the batch (and their columns of padding nobody needs any more)."""
        leaving = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in leaving]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.adapters = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        first = int(self.mask[index].any(0).nonzero()[0])  # leading columns that are padding in every row
        self.mask = self.mask[index, first:]
        self.cache = self.cache.select(index, first)
        self.adapters = self.engine.row_adapters([row.adapter for row in self.rows])

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits (N, V). A row whose choice fails (NaN logits from a
        bad adapter, ...) ends as failed, alone: the other rows go on."""
        adjusted, live = [], []
        for row, row_logits in zip(rows, logits):
            if len(row.tokens) < row.request.sampling.min_new_tokens and self.end_ids:
                row_logits = row_logits.clone()
                row_logits[list(self.end_ids)] = float("-inf")
            try:
                adjusted.append(row.picker.adjust(row_logits, row.tokens))
                live.append(row)
            except Exception:
                log.exception("choosing a reply's next token failed")
                row.finish = "failed"
        if not live:
            return
        for row, token in zip(live, choose_tokens([row.picker for row in live], torch.stack(adjusted))):
            if isinstance(token, Exception):
                log.error("choosing a reply's next token failed: %r", token)
                row.finish = "failed"
            elif token in self.end_ids:
                row.finish = "end"
            else:
                row.tokens.append(token)
                row.last = token
                if row.first_token_at is None:
                    row.first_token_at = time.perf_counter()
                if any(tuple(row.tokens[-len(seq):]) == seq for seq in row.request.sampling.stop_sequences):
                    row.finish = "end"
                elif len(row.tokens) >= row.request.sampling.max_new_tokens:
                    row.finish = "length"

    def _merge(self, rows: list[Row], cache: KVCache, mask: torch.Tensor, adapters: RowAdapters | None) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.adapters = rows, cache, mask, adapters
            return
        # everything is built first and assigned at the end, so that a failure leaves the batch as it was
        width = max(self.mask.shape[1], mask.shape[1])
        merged_mask = torch.cat([pad_left(self.mask, width, 1), pad_left(mask, width, 1)])  # (B+N, width)
        merged_cache = self.cache.concat(cache)  # (B+N, H, width, D) per layer
        merged_adapters = self.engine.row_adapters([row.adapter for row in self.rows + rows])
        self.rows, self.cache, self.mask, self.adapters = self.rows + rows, merged_cache, merged_mask, merged_adapters


SHARED_PREFIX_TOKENS = 32
"""Prompts of one prefill group that start with at least this many tokens in common, all under one
adapter (or none), run that start once for all of them: the few-shot examples before each of a
compression's recall questions (adapter_core.memory.restatement), a system prompt."""


def _shared_prefix(rows: list[Row]) -> int:
    """How many leading tokens the rows' prompts share, if worth running once (else 0); each row
    keeps at least its last token to run itself, whose logits choose its first token."""
    if len(rows) < 2 or any(row.request.state is not rows[0].request.state for row in rows):
        return 0
    prompts = [row.request.prompt for row in rows]
    shared = 0
    for column in zip(*prompts):
        if any(t != column[0] for t in column):
            break
        shared += 1
    shared = min(shared, min(len(p) for p in prompts) - 1)
    return shared if shared >= SHARED_PREFIX_TOKENS else 0


def _run_chunks(engine: GenerativeAdapterModel, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """ids (N, S) after the cache's columns, PREFILL_CHUNK_TOKENS at a time, extending the cache;
    mask (N, C + S) covers the cache's C columns and the ids. Logits (N, V) at the last column.
    The adapters and pause are the caller's (engine.applying)."""
    before = mask.shape[1] - ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, before:]  # (N, S)
    for start in range(0, ids.shape[1], PREFILL_CHUNK_TOKENS):
        end = min(start + PREFILL_CHUNK_TOKENS, ids.shape[1])
        logits = engine.base_model(input_ids=ids[:, start:end], attention_mask=mask[:, :before + end],
                                   position_ids=positions[:, start:end], cache=cache,
                                   use_cache=True, logits_to_keep=1).logits[:, -1]  # (N, V)
    return logits


PADDING_ALLOWED = 1.25
"""A prefill group's padded size may be this many times its real tokens."""


def _by_length(rows: list[Row]) -> list[list[Row]]:
    """Rows in groups of similar prompt length, shortest first (see DecodeBatch.join)."""
    groups: list[list[Row]] = []
    real = 0
    for row in sorted(rows, key=lambda r: len(r.request.prompt)):
        n = len(row.request.prompt)
        if groups and n * (len(groups[-1]) + 1) <= PADDING_ALLOWED * (real + n):
            groups[-1].append(row)
            real += n
        else:
            groups.append([row])
            real = n
    return groups


def finished_reply(row: Row, tokenizer, started: float) -> Reply:
    """The Reply of a row that ended; `started`: perf_counter() when it was asked for."""
    text = tokenizer.decode(row.tokens, skip_special_tokens=True).strip() if tokenizer is not None else ""
    return Reply(tokens=tuple(row.tokens), text=text,
                 finish=row.finish or "cancelled", prompt_tokens=len(row.request.prompt),
                 first_token_s=None if row.first_token_at is None else row.first_token_at - started,
                 total_s=time.perf_counter() - started)


def reply(engine: GenerativeAdapterModel, requests: Sequence[ReplyRequest], max_rows: int = 32,
          pause: Callable[[], None] | None = None) -> list[Reply]:
    """Decode the requests together, up to max_rows at a time (rows leave as they end and waiting
    requests join). Replies streamed token by token: adapter_core.serving.scheduler. pause: called
    before each step and join and before each decoder layer of a prefill, where the caller (a
    compression of the inference loop) may decode other replies."""
    started = time.perf_counter()
    batch = DecodeBatch(engine)
    waiting = list(enumerate(requests))
    index: dict[int, int] = {}  # id(row) -> request number
    replies: list[Reply | None] = [None] * len(requests)
    while waiting or batch.rows:
        if pause is not None:
            pause()
        if waiting and len(batch) < max_rows:
            take, waiting = waiting[:max_rows - len(batch)], waiting[max_rows - len(batch):]
            for (i, _), row in zip(take, batch.add(batch.prefill([r for _, r in take], pause))):
                index[id(row)] = i
        else:
            batch.step()
        ended = [row for row in batch.rows if row.finish]
        for row in ended:
            replies[index.pop(id(row))] = finished_reply(row, engine.tokenizer, started)
        batch.leave(ended)
    return replies  # type: ignore[return-value]
