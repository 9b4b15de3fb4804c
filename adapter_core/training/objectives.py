"""Training batches for the three objectives; the engine computes their loss (`engine.loss`).

Every example is a list of windows: the ones that write memory are encoded in one memory pass,
where window j sees windows < j only through the adapter (rows never attend to each other,
positions restart at 0); the read-only query windows after them then read the whole memory.

  completion      windows of generic text; loss on every window after the first: predict text
                  whose beginning is only in memory
  reconstruction  windows of generic text, then a query window that repeats a span of one of them
                  after a short cue; loss on the repeated tokens: copy from memory
  qa              a synthetic conversation's history, then one query window per question (chat
                  prompt + answer); loss on the answer tokens only
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property

from ..data import corpus
from ..data.conversation import Turn, history_text, prompt_ids
from ..data.personas import TRAIN, make_conversation
from ..memory.windows import IGNORE, TrainingBatch, Window, pack_training_batch

OBJECTIVES = ("completion", "reconstruction", "qa")


@dataclass
class DataRecipe:
    mix: dict[str, float] = field(default_factory=lambda: {"completion": 0.2, "reconstruction": 0.3, "qa": 0.5})
    """Relative frequency of each objective; each step draws one objective for its whole batch."""
    batch_size: int = 8
    """Examples (users) per step."""
    context_windows: tuple[int, int] = (1, 4)
    """Range of memory windows per completion/reconstruction example."""
    cue_tokens: int = 8
    """Tokens of a reconstructed span given as its cue (no loss on them)."""
    qa_facts: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 10)
    """Number of facts per training conversation, drawn uniformly from this list."""
    qa_lengths: tuple[int, ...] = (128, 256, 512, 1024)
    """Approximate history lengths in tokens, drawn uniformly from this list."""
    update_probability: float = 0.3
    """Chance that a fact that can change is updated later in the conversation."""
    recent_turns_probability: float = 0.25
    """Chance that the last 2-4 turns are in the prompt instead of memory (as in the app)."""

    def __post_init__(self) -> None:
        self.context_windows = tuple(self.context_windows)
        self.qa_facts, self.qa_lengths = tuple(self.qa_facts), tuple(self.qa_lengths)
        unknown = set(self.mix) - set(OBJECTIVES)
        if unknown or not any(v > 0 for v in self.mix.values()) or any(v < 0 for v in self.mix.values()):
            raise ValueError(f"mix must give non-negative weights to objectives among {OBJECTIVES}, got {self.mix}")
        if self.batch_size < 1 or not 1 <= self.context_windows[0] <= self.context_windows[1]:
            raise ValueError("batch_size must be >= 1 and context_windows a range (low, high) with low >= 1")


class DataSource:
    """Deterministic batches: the batch of step k depends only on (seed, k), so a resumed run
    sees exactly the data an uninterrupted one would have seen."""

    def __init__(self, tokenizer, recipe: DataRecipe, window: int, seed: int):
        self.tok, self.recipe, self.window, self.seed = tokenizer, recipe, window, seed

    @cached_property
    def text_tokens(self) -> list[int]:
        """The generic training text as one token stream (documents separated by blank lines)."""
        text = "\n\n".join(corpus.documents(corpus.TRAIN))
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def objective_for(self, step: int) -> str:
        rng = random.Random(f"{self.seed}-objective-{step}")
        names = [n for n in OBJECTIVES if self.recipe.mix.get(n, 0) > 0]
        return rng.choices(names, weights=[self.recipe.mix[n] for n in names])[0]

    def batch(self, step: int) -> tuple[str, TrainingBatch]:
        objective = self.objective_for(step)
        rng = random.Random(f"{self.seed}-batch-{step}")
        make = {"completion": self._completion, "reconstruction": self._reconstruction, "qa": self._qa}[objective]
        return objective, pack_training_batch([make(rng) for _ in range(self.recipe.batch_size)], self.tok.pad_token_id)

    def _text_windows(self, rng: random.Random, count: int) -> list[list[int]]:
        w, stream = self.window, self.text_tokens
        start = rng.randrange(0, max(1, len(stream) - count * w))
        return [stream[start + i * w:start + (i + 1) * w] for i in range(count)]

    def _completion(self, rng: random.Random) -> list[Window]:
        windows = self._text_windows(rng, rng.randint(*self.recipe.context_windows) + 1)
        return [Window(windows[0])] + [Window(ids, labels=list(ids)) for ids in windows[1:]]

    def _reconstruction(self, rng: random.Random) -> list[Window]:
        memory = self._text_windows(rng, rng.randint(*self.recipe.context_windows))
        source = rng.choice(memory)
        cue = self.recipe.cue_tokens
        length = rng.randint(min(len(source), 2 * cue), len(source))
        begin = rng.randint(0, len(source) - length)
        span = source[begin:begin + length]
        query = Window(span, labels=[IGNORE] * cue + span[cue:], writes_memory=False)
        return [Window(ids) for ids in memory] + [query]

    def _qa(self, rng: random.Random) -> list[Window]:
        conversation = make_conversation(rng, TRAIN, rng.choice(self.recipe.qa_facts), rng.choice(self.recipe.qa_lengths),
                                         self.recipe.update_probability)
        turns = conversation.turns
        recent: list[Turn] = []
        if rng.random() < self.recipe.recent_turns_probability:
            keep = rng.choice([2, 4])
            turns, recent = turns[:-keep], turns[-keep:]
        return qa_windows(self.tok, self.window, history_text(turns), recent,
                          [(q.question, q.answer) for q in conversation.questions])


def qa_windows(tok, window: int, history: str, recent: list[Turn],
               questions: list[tuple[str, str]]) -> list[Window]:
    """History windows, then one read-only query window per question with loss on its answer."""
    history_ids = tok(history, add_special_tokens=False)["input_ids"]
    windows = [Window(history_ids[i:i + window]) for i in range(0, len(history_ids), window)]
    for question, answer in questions:
        prompt = prompt_ids(tok, question, recent)
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        windows.append(Window(prompt + answer_ids, labels=[IGNORE] * len(prompt) + answer_ids,
                              writes_memory=False))
    return windows
