"""How replies are decoded: settings that suit a 135M chat model, and a measure of degeneration.

Greedy decoding of SmolLM2-135M-Instruct falls into loops (one phrase repeated up to the token
cap), and so does sampling at the model card's temperature without a repetition penalty. The
defaults below sample as the card recommends (temperature 0.2, top-p 0.9), penalize tokens the
reply has already used (1.2, the reply only: a penalty on the prompt also hits every earlier end
of turn and makes replies run long) and stop at the chat template's end of turn.
`repetition_stats` is the measure they were chosen by; scripts/reply_quality.py measures,
docs/reply-quality.md has the figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
"""End-of-turn tokens of common chat templates, looked for when rendering a turn does not tell."""

_SENTINEL = "\u2063memchat-end-of-turn-probe\u2063"


@dataclass(frozen=True)
class SamplingConfig:
    """How one reply is decoded; `generate_kwargs` turns it into arguments for `generate`.

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

    @classmethod
    def greedy(cls, max_new_tokens: int = 160, repetition_penalty: float = 1.0) -> "SamplingConfig":
        """Deterministic decoding (evaluation, tests): always the most likely token."""
        return cls(do_sample=False, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)

    def generate_kwargs(self, tokenizer) -> dict:
        """Keyword arguments for `generate` (transformers), ending at the end of the turn.

        The reply-only penalty is a logits processor: build the kwargs anew for each call of generate.
        """
        eos = end_of_turn_ids(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1 and self.penalize_prompt:
            kwargs["repetition_penalty"] = self.repetition_penalty
        elif self.repetition_penalty != 1:
            kwargs["logits_processor"] = LogitsProcessorList([ReplyRepetitionPenalty(self.repetition_penalty)])
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        kwargs.update(pad_token_id=pad, eos_token_id=eos)
        return kwargs


class ReplyRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty (CTRL paper) on the tokens of the reply only, not the prompt's.

    The prompt is what the input holds at the first step; a later call whose input does not start
    with that prompt is taken for a new generation. transformers runs custom processors before
    temperature and top-p, so the penalty acts on the model's own distribution.
    """

    def __init__(self, penalty: float):
        if not (_is_number(penalty) and penalty >= 1):
            raise ValueError(f"penalty must be a finite number >= 1, got {penalty!r}")
        self.penalty = float(penalty)
        self.prompt: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"ReplyRepetitionPenalty({self.penalty})"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        known = self.prompt
        if (known is None or input_ids.shape[0] != known.shape[0] or input_ids.shape[1] <= known.shape[1]
                or not torch.equal(input_ids[:, :known.shape[1]], known)):
            self.prompt = input_ids.clone()
            return scores
        reply = input_ids[:, known.shape[1]:]
        seen = scores.gather(1, reply)
        penalized = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, reply, penalized)


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
