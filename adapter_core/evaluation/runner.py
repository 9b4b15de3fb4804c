"""Asking every question of every conversation in several modes and scoring the answers.

Modes:
  closed_book     the question alone, base model: what can be guessed without memory
  full_history    all turns in the prompt (earliest dropped when longer than the context limit)
  adapter         the whole history absorbed into an adapter, the question alone in the prompt
  adapter_recent  all but the last `recent_turns` turns absorbed, those in the prompt (as in the app)
  adapter_swapped the question alone under another conversation's adapter (the next one in the
                  set): learning the answers' format helps it as much as `adapter`; only memory
                  of the user opens a gap between the two (the swap test, report.swap_test)
  finetuned       the whole history fine-tuned into a LoRA pair (adapter_core.memory.finetune), the
                  question alone in the prompt
  finetuned_swapped  the question alone under the next conversation's fine-tuned pair (the pair
                  `finetuned` made for it: each conversation is fine-tuned once)

The `adapter*` modes use the generator (GenerativeAdapterModel.absorb), the `finetuned*` ones the
fine-tuning compressor; `timings` gets each kind's seconds of compression apart from answering.

How the history and the question are put before the model (a chat, or a transcript of named
people): adapter_core.evaluation.prompts. Each answer is generated and its gold scored from one
pass over its prompt: adapter_core.evaluation.answering. Tables: adapter_core.evaluation.report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..data.dataset import Conversation
from ..memory.finetune import FinetuneCompressor
from ..memory.model import GenerativeAdapterModel
from ..memory.state import AdapterState
from . import prompts
from .answering import Answer, answer
from .dates import date_match
from .metrics import contains_answer, token_f1

MODES = ("closed_book", "full_history", "adapter", "adapter_recent", "adapter_swapped", "finetuned",
         "finetuned_swapped")
SWAPPED = ("adapter_swapped", "finetuned_swapped")
"""The modes that answer under another conversation's adapter (they need two conversations at least)."""


@dataclass(frozen=True)
class EvalOptions:
    modes: tuple[str, ...] = MODES
    """Which modes to run (see the module docstring)."""
    max_new_tokens: int = 24
    """Greedy answer length; answers are short phrases."""
    recent_turns: int = 4
    """Turns kept in the prompt, not in the adapter, in adapter_recent mode."""
    batch_size: int = 8
    """Questions answered together (prompts of the same mode are batched together)."""
    conversations_per_pass: int = 8
    """Conversations absorbed together in one batch."""
    context_limit: int | None = None
    """Prompt + answer tokens the model can attend to; default: the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
        if self.max_new_tokens < 1:  # the greedy loop always takes the first token
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


def context_limit(engine: GenerativeAdapterModel, options: EvalOptions) -> int:
    return options.context_limit or engine.base_model.config.max_position_embeddings


@dataclass(frozen=True)
class Result:
    conversation: str
    mode: str
    question: str
    category: str
    answer: str
    prediction: str
    contains: bool
    """A gold answer (or alias) appears in the prediction (adapter_core.evaluation.metrics)."""
    f1: float
    date_match: bool | None
    """The prediction gives the gold answer's dates; None: the gold holds no date."""
    nll: float
    """Mean negative log-likelihood per token of the gold answer as the reply."""
    superseded: bool
    """The prediction contains an out-of-date value of an updated fact."""
    has_update: bool
    n_facts: int | None
    history_turns: int
    history_tokens: int
    """Tokens of the history's turns (each turn's line in the absorbed text, summed)."""
    kept_turns: int
    """Turns the answer could draw on: absorbed into the adapter or shown in the prompt."""
    kept_tokens: int
    truncated: bool
    """Turns the mode shows in the prompt were dropped to fit the context limit."""
    evidence_cut: bool | None
    """A turn the data names as evidence is not among the kept ones; None: the data names none."""
    prompt_tokens: int


@dataclass(frozen=True)
class _Ask:
    conversation: Conversation
    index: int
    mode: str
    prompt: tuple[int, ...]
    gold: tuple[int, ...]
    """The gold answer's ids, scored after the prompt."""
    state: AdapterState | None
    history_tokens: int
    kept_turns: int
    kept_tokens: int
    truncated: bool
    evidence_cut: bool | None


def swap_partners(conversations: Sequence[Conversation]) -> list[Conversation]:
    """Whose adapter answers each conversation's questions in adapter_swapped: the next one in the
    set (the last one's: the first)."""
    return [*conversations[1:], *conversations[:1]]


def evaluate(engine: GenerativeAdapterModel, conversations: Sequence[Conversation],
             options: EvalOptions | None = None, progress: bool = True, compressor: FinetuneCompressor | None = None,
             timings: dict[str, float] | None = None, finetuned: dict[str, AdapterState] | None = None) -> list[Result]:
    """compressor: the fine-tuning one of the finetuned modes (default: FinetuneCompressor(engine));
    timings: filled with seconds of 'generator compression', 'finetune compression' and 'answering';
    finetuned: filled with each conversation's fine-tuned state, by conversation id."""
    options = options or EvalOptions()
    if any(m in options.modes for m in SWAPPED) and len(conversations) < 2:
        raise ValueError("a swapped mode needs at least two conversations (one's adapter answers the other's questions)")
    if compressor is None and {"finetuned", "finetuned_swapped"} & set(options.modes):
        compressor = FinetuneCompressor(engine)
    timings = {} if timings is None else timings
    limit = context_limit(engine, options)
    partners = swap_partners(conversations)
    finetuned = {} if finetuned is None else finetuned  # conversation id -> its pair, made once for both modes
    results: list[Result] = []
    bar = tqdm(total=sum(len(c.questions) for c in conversations) * len(options.modes), disable=not progress,
               desc="evaluating", unit="answer")
    step = options.conversations_per_pass
    for start in range(0, len(conversations), step):
        asks = _prepare(engine, list(conversations[start:start + step]), partners[start:start + step], options, limit,
                        compressor, finetuned, timings)
        started = time.perf_counter()
        for mode in options.modes:
            mode_asks = sorted((a for a in asks if a.mode == mode), key=lambda a: len(a.prompt))  # less padding
            for b in range(0, len(mode_asks), options.batch_size):
                batch = mode_asks[b:b + options.batch_size]
                answers = _answers(engine, batch, options.max_new_tokens)
                results += [_score(ask, a) for ask, a in zip(batch, answers)]
                bar.update(len(batch))
        _add_time(timings, "answering", started)
    bar.close()
    return results


def _add_time(timings: dict[str, float], what: str, started: float) -> None:
    timings[what] = round(timings.get(what, 0.0) + time.perf_counter() - started, 1)


def _split(mode: str, turns: int, recent: int) -> tuple[int, int]:
    """(absorbed, shown): the earliest turns that go into the adapter, the latest ones the prompt
    shows (before fitting it to the context limit)."""
    recent = min(recent, turns)
    return {"closed_book": (0, 0), "full_history": (0, turns), "adapter": (turns, 0),
            "adapter_recent": (turns - recent, recent), "adapter_swapped": (0, 0), "finetuned": (turns, 0),
            "finetuned_swapped": (0, 0)}[mode]


def _prepare(engine: GenerativeAdapterModel, group: list[Conversation], partners: list[Conversation],
             options: EvalOptions, limit: int, compressor: FinetuneCompressor | None = None,
             finetuned: dict[str, AdapterState] | None = None, timings: dict[str, float] | None = None) -> list[_Ask]:
    """partners[u]: the conversation whose adapter answers group[u]'s questions in the swapped modes;
    compressor: the finetuned modes' (needed for them); finetuned: the pairs made so far, by
    conversation id (filled in here); timings: as evaluate's."""
    tok = engine.tokenizer
    finetuned = {} if finetuned is None else finetuned
    timings = {} if timings is None else timings
    states: dict[str, list[AdapterState]] = {}
    started = time.perf_counter()
    for mode in ("adapter", "adapter_recent"):
        if mode in options.modes:
            texts = [prompts.memory_text(c, _split(mode, len(c.turns), options.recent_turns)[0]) for c in group]
            states[mode] = engine.absorb_many([engine.empty_state()] * len(group), texts)
    if "adapter_swapped" in options.modes:
        texts = [prompts.memory_text(p, len(p.turns)) for p in partners]
        states["adapter_swapped"] = engine.absorb_many([engine.empty_state()] * len(group), texts)
    _add_time(timings, "generator compression", started)
    if compressor is not None:
        started = time.perf_counter()
        for c in [*group, *partners] if "finetuned_swapped" in options.modes else group:
            if c.id not in finetuned:
                with torch.inference_mode(False):
                    finetuned[c.id] = compressor.absorb(compressor.empty_state(), prompts.memory_text(c, len(c.turns)))
        states["finetuned"] = [finetuned[c.id] for c in group]
        states["finetuned_swapped"] = [finetuned[p.id] for p in partners] if "finetuned_swapped" in options.modes else []
        _add_time(timings, "finetune compression", started)
    asks = []
    for u, conversation in enumerate(group):
        lines = prompts.turn_lines(conversation)
        counts = [len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"]] if lines else []
        n = len(counts)
        for i, q in enumerate(conversation.questions):
            gold = tuple(tok(q.answer, add_special_tokens=False)["input_ids"])
            room = max(options.max_new_tokens, len(gold))  # the gold is scored where the answer goes
            evidence = [conversation.turn_index(s, t) for s, t in q.evidence]
            for mode in options.modes:
                absorbed, wanted = _split(mode, n, options.recent_turns)
                ids, shown = prompts.fit(tok, conversation, q.question, wanted, limit - room)
                asks.append(_Ask(
                    conversation, i, mode, tuple(ids), gold, states[mode][u] if mode in states else None,
                    history_tokens=sum(counts), kept_turns=absorbed + shown,
                    kept_tokens=sum(counts[:absorbed]) + sum(counts[n - shown:]), truncated=shown < wanted,
                    evidence_cut=any(absorbed <= e < n - shown for e in evidence) if evidence else None))
    return asks


def _answers(engine: GenerativeAdapterModel, batch: list[_Ask], max_new_tokens: int) -> list[Answer]:
    return answer(engine, [a.prompt for a in batch], [a.gold for a in batch], [a.state for a in batch],
                  max_new_tokens)


def _score(ask: _Ask, a: Answer) -> Result:
    c = ask.conversation
    q = c.questions[ask.index]
    golds = [q.answer, *q.aliases]
    contains = contains_answer(a.text, golds)
    return Result(
        conversation=c.id, mode=ask.mode, question=q.question, category=q.category, answer=q.answer,
        prediction=a.text, contains=contains, f1=token_f1(a.text, golds), date_match=date_match(a.text, golds),
        nll=a.nll, superseded=bool(q.superseded) and contains_answer(a.text, q.superseded) and not contains,
        has_update=bool(q.superseded), n_facts=c.meta.get("n_facts"), history_turns=len(c.turns),
        history_tokens=ask.history_tokens, kept_turns=ask.kept_turns, kept_tokens=ask.kept_tokens,
        truncated=ask.truncated, evidence_cut=ask.evidence_cut, prompt_tokens=len(ask.prompt),
    )


def results_as_dicts(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]
