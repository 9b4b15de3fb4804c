"""How a user's turns become their adapter state: two compressors behind one interface.

    generator  GenerativeAdapterModel.absorb: the generator writes each window in one forward
               pass; remembers only once the generator is trained (that needs a GPU)
    finetune   adapter_core.memory.finetune: a LoRA pair per user, fine-tuned on the user's turns; needs
               no trained generator, remembers on the CPU, costs backward passes

Both take a state and texts and give a new state (never changing the old), step aside at `pause`
for replies, tell `progress` how far they are (steps done, steps in all), and name what made a state (`id`): a state of another compressor is rebuilt from the
history, never continued. The app (app/memory.py) holds one, chosen by --compressor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .finetune import FinetuneCompressor, Progress
from .model import GenerativeAdapterModel, Texts
from .state import AdapterState


class Compressor(Protocol):
    name: str
    """'generator' or 'finetune'."""
    replay_tokens: int
    """Most tokens of earlier turns it wants trained again with new ones (0: it needs none)."""

    @property
    def id(self) -> str:
        """What made a state (a state of another id is rebuilt, not continued)."""

    def empty_state(self) -> AdapterState: ...

    def absorb(self, state: AdapterState, texts: Texts, replay: Sequence[str] = (),
               pause: Callable[[], None] | None = None, progress: Progress | None = None) -> AdapterState: ...


class GeneratorCompressor:
    """The generator's single pass (GenerativeAdapterModel.absorb), as a Compressor."""

    name = "generator"
    replay_tokens = 0

    def __init__(self, engine: GenerativeAdapterModel, windows_per_pass: int = 4) -> None:
        self.engine, self.windows_per_pass = engine, windows_per_pass

    @property
    def id(self) -> str:
        return self.engine.generator_id  # changes when a trained generator is loaded or saved

    def empty_state(self) -> AdapterState:
        return self.engine.empty_state()

    def absorb(self, state: AdapterState, texts: Texts, replay: Sequence[str] = (),
               pause: Callable[[], None] | None = None, progress: Progress | None = None) -> AdapterState:
        """The generator writes only what it is given: earlier turns stay in its running sums. One
        step (a pass is seconds: its progress is not worth telling)."""
        new = self.engine.absorb(state, texts, self.windows_per_pass, pause)
        if progress is not None:
            progress(1, 1)
        return new


COMPRESSORS = ("finetune", "generator")


def make_compressor(name: str, engine: GenerativeAdapterModel) -> Compressor:
    if name == "finetune":
        return FinetuneCompressor(engine)
    if name == "generator":
        return GeneratorCompressor(engine)
    raise ValueError(f"unknown compressor {name!r}: one of {', '.join(COMPRESSORS)}")
