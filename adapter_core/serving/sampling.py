"""How replies are decoded: settings that suit a 135M chat model, and a measure of degeneration.

Greedy decoding of SmolLM2-135M-Instruct falls into loops (one phrase repeated up to the token
cap), and so does sampling at the model card's temperature without a repetition penalty. The
defaults below sample as the card recommends (temperature 0.2, top-p 0.9), penalize tokens the
reply has already used (1.2, the reply only: a penalty on the prompt also hits every earlier end
of turn and makes replies run long) and stop at the chat template's end of turn. `TokenPicker`
applies them, one reply at a time, inside adapter_core.serving.decoding's batched loop.
`repetition_stats` is the measure they were chosen by; scripts/reply_quality.py measures,
docs/reply-quality.md has the figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
"""End-of-turn tokens of common chat templates, looked for when rendering a turn does not tell."""

_SENTINEL = "\u2063memchat-end-of-turn-probe\u2063"

NUCLEUS_CANDIDATES = 256
"""Likeliest tokens searched for the top-p nucleus before the whole vocabulary is sorted."""


@dataclass(frozen=True)
class SamplingConfig:
    """How one reply is decoded (applied by `TokenPicker`).

    The defaults are for chat replies; `SamplingConfig.greedy()` is for deterministic uses.
    """

    # --- sampling ---
    do_sample: bool = True
    """Sample the next token (True) or take the most likely one (False: greedy, deterministic)."""
    temperature: float = 0.2
    """Divides the logits before sampling; low keeps a small model on its likeliest words (model card: 0.2)."""
    top_p: float = 0.9
    """Nucleus sampling: draw only from the smallest set of tokens holding this much probability."""

    # --- repetition ---
    repetition_penalty: float = 1.2
    """Divides the logits of tokens already in the reply (1.0: off); breaks the loops of a 135M model."""
    penalize_prompt: bool = False
    """Also penalize the prompt's tokens (transformers' own penalty). Off: the prompt holds every earlier
    end of turn, so penalizing it makes replies run long, and it discourages the user's own words."""
    no_repeat_ngram_size: int = 0
    """Forbid any n-gram of tokens from occurring twice in the prompt and reply (0: off)."""

    # --- length ---
    max_new_tokens: int = 160
    """Longest reply in tokens; with these settings 59 of 60 measured replies ended by themselves within it."""
    min_new_tokens: int = 0
    """The end of turn is not chosen before this many tokens (benchmarks use it for replies of one length)."""
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    """Token sequences that end the reply once it ends with one of them (they stay in it): a
    compression's recall question ends at the blank line after its answer."""

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if self.do_sample and not (_is_number(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {self.temperature!r} "
                             "(for deterministic replies use SamplingConfig.greedy())")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty >= 1):
            raise ValueError(f"repetition_penalty must be a finite number >= 1 (1.0: off), "
                             f"got {self.repetition_penalty!r}")
        if not isinstance(self.penalize_prompt, bool):
            raise ValueError(f"penalize_prompt must be True or False, got {self.penalize_prompt!r}")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0: off), "
                             f"got {self.no_repeat_ngram_size!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be an integer from 0 to max_new_tokens, got {self.min_new_tokens!r}")
        if not isinstance(self.stop_sequences, tuple) or not all(
                isinstance(seq, tuple) and seq and all(_is_int(t) and t >= 0 for t in seq) for seq in self.stop_sequences):
            raise ValueError(f"stop_sequences must be a tuple of non-empty tuples of token ids, got {self.stop_sequences!r}")

    @classmethod
    def greedy(cls, max_new_tokens: int = 160, repetition_penalty: float = 1.0,
               stop_sequences: tuple[tuple[int, ...], ...] = ()) -> "SamplingConfig":
        """Deterministic decoding (evaluation, tests): always the most likely token."""
        return cls(do_sample=False, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                   stop_sequences=stop_sequences)


class TokenPicker:
    """Chooses the tokens of one reply as its SamplingConfig says, from the model's logits.

    The penalty and the n-gram ban are transformers' own processors (the reply-only penalty is
    not shown the prompt at all). Temperature and top-p are done here rather than by transformers'
    warpers, which sort the whole vocabulary for every row at every step (4 ms a token for a 49K
    vocabulary on a 2-core CPU, most of a 16-user decode step): the nucleus is looked for among
    the `NUCLEUS_CANDIDATES` likeliest tokens first, and the whole vocabulary is sorted only when
    they hold less than top_p; `choose_tokens` does that for all rows of a batch at once. Each
    reply has its own random generator, so replies decoded in one batch do not share a stream.
    """

    def __init__(self, sampling: SamplingConfig, prompt: Sequence[int], seed: int | None = None):
        self.sampling = sampling
        # the processors see the prompt only when a setting needs it (it can be thousands of tokens)
        self.context = [int(t) for t in prompt] if sampling.penalize_prompt or sampling.no_repeat_ngram_size else []
        processors = []
        if sampling.repetition_penalty != 1:
            ignore = None if sampling.penalize_prompt or not self.context else len(self.context)
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty, prompt_ignore_length=ignore))
        if sampling.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram_size))
        self.processors = LogitsProcessorList(processors)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reply: Sequence[int]) -> int:
        """The next token after `reply` (the tokens chosen so far), given logits (V,) for it."""
        token = choose_tokens([self], self.adjust(logits, reply).unsqueeze(0))[0]
        if isinstance(token, Exception):
            raise token
        return token

    def adjust(self, logits: torch.Tensor, reply: Sequence[int]) -> torch.Tensor:
        """The logits (V,) after the penalty, the n-gram ban and the temperature (fp32)."""
        scores = logits.float().unsqueeze(0)  # (1, V)
        if self.processors:
            ids = torch.tensor([self.context + list(reply)], dtype=torch.long, device=scores.device)  # (1, L)
            scores = self.processors(ids, scores)
        return scores[0] / self.sampling.temperature if self.sampling.do_sample else scores[0]

    def draw(self, top: torch.Tensor, ids: torch.Tensor, log_total: torch.Tensor, scores: torch.Tensor) -> int:
        """A token from the nucleus: top (k,) the likeliest adjusted scores and their ids, log_total
        the log of the softmax's normalizer; scores (V,) all of them, for a nucleus wider than k."""
        probs = (top - log_total).exp()  # (k,)
        before = probs.cumsum(0) - probs  # (k,) mass of the likelier tokens
        if before[-1] + probs[-1] < self.sampling.top_p and top.numel() < scores.numel():
            top, ids = scores.topk(scores.numel())  # the nucleus is wider: the whole vocabulary, sorted
            probs = (top - log_total).exp()
            before = probs.cumsum(0) - probs
        keep = before < self.sampling.top_p  # (k,) at least the likeliest token
        choice = torch.multinomial(probs[keep], 1, generator=self.generator)
        return int(ids[keep][choice])


def choose_tokens(pickers: Sequence[TokenPicker], scores: torch.Tensor) -> list[int | Exception]:
    """The next token of each row: scores (N, V) from each row's picker.adjust. What takes a pass
    over the vocabulary (the normalizer, the likeliest candidates) is done for all sampled rows in
    one call; a row whose draw fails (NaN scores, ...) gets its exception, the others their token."""
    scores = scores.cpu()
    chosen: list[int | Exception] = [int(t) for t in scores.argmax(-1)]  # greedy rows are done
    sampled = [i for i, p in enumerate(pickers) if p.sampling.do_sample]
    if sampled:
        rows = scores[sampled]  # (S, V)
        log_totals = torch.logsumexp(rows, dim=-1)  # (S,)
        tops, ids = rows.topk(min(NUCLEUS_CANDIDATES, rows.shape[-1]), dim=-1)  # (S, k) each
        for j, i in enumerate(sampled):
            try:
                chosen[i] = pickers[i].draw(tops[j], ids[j], log_totals[j], rows[j])
            except Exception as e:  # noqa: BLE001 - this row's failure, for the caller to report
                chosen[i] = e
    return chosen


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos, then the chat template's end-of-turn
    token when it has one and it differs (for SmolLM2 both are <|im_end|>, id 2)."""
    ids = [tokenizer.eos_token_id, chat_end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def chat_end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, or None.

    Found by rendering a turn; templates that cannot render one are searched for a known token.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:  # templates may reject such a conversation; fall back to the known names
        text = None
    if isinstance(text, str) and _SENTINEL in text:
        after = text.split(_SENTINEL, 1)[1]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if ids and _is_special(tokenizer, ids[0]):
            return int(ids[0])
    for name in KNOWN_END_OF_TURN:
        if name in str(template):
            token_id = tokenizer.convert_tokens_to_ids(name)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                return int(token_id)
    return None


@dataclass(frozen=True)
class RepetitionStats:
    n: int
    """Length of the n-grams counted."""
    total: int
    """n-grams in the text (words - n + 1, or 0 when shorter than n)."""
    distinct: int
    """Different n-grams among them."""

    @property
    def repeated(self) -> int:
        """n-grams that repeat an earlier one."""
        return self.total - self.distinct

    @property
    def repeated_share(self) -> float:
        """repeated / total: 0 for text with no repeated n-gram, near 1 for one phrase looping."""
        return self.repeated / self.total if self.total else 0.0


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, inner apostrophes); punctuation and spacing are ignored."""
    return re.findall(r"\w+(?:['\u2019]\w+)*", text.lower())


def repetition_stats(items: str | Sequence[int] | Sequence[str], n: int = 4) -> RepetitionStats:
    """How much of a reply repeats itself: its n-grams of words (text) or of tokens (a sequence of ids)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    units = words(items) if isinstance(items, str) else list(items)
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return RepetitionStats(n, len(grams), len(set(grams)))


def _is_special(tokenizer, token_id: int) -> bool:
    if token_id in set(getattr(tokenizer, "all_special_ids", ())):
        return True
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return token_id in added and getattr(added[token_id], "special", False)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
