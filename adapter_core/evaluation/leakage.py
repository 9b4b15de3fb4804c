"""Whether a user's adapter leaks into replies about other things: the perplexity of unrelated text
(neutral.txt, everyday prose that no test conversation mentions) under each adapter against the
base model's. A ratio near 1 keeps the model's ordinary replies; the target is <= 1.10."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..memory.model import GenerativeAdapterModel
from ..memory.state import AdapterState

NEUTRAL_TEXT = Path(__file__).with_name("neutral.txt")


@torch.inference_mode()
def perplexity(engine: GenerativeAdapterModel, state: AdapterState | None, text: str, window: int = 512) -> float:
    """exp(mean next-token NLL) of `text` in windows of `window` tokens, under `state` (None: the base model)."""
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start:start + window]], device=engine.device)  # (1, T)
        if chunk.shape[1] < 2:
            continue
        logits = engine(chunk, states=[state]).logits[0, :-1].float()  # (T-1, V)
        total += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def neutral_perplexity(engine: GenerativeAdapterModel, states: Sequence[AdapterState]) -> dict:
    """The base model's perplexity of the neutral text and each state's, as ratios to it."""
    text = NEUTRAL_TEXT.read_text()
    base = perplexity(engine, None, text)
    ratios = [perplexity(engine, s, text) / base for s in states]
    return {"base": base, "n": len(ratios), "mean_ratio": sum(ratios) / len(ratios) if ratios else None,
            "max_ratio": max(ratios, default=None)}
