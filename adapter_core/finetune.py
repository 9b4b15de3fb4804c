"""The second compressor: a LoRA pair per user, fine-tuned on that user's own chat.

The generator (adapter_core.model) writes memory in one forward pass, but only once it is trained,
which needs a GPU. This compressor needs none: it trains a plain LoRA pair on each adapted module
(the same modules as the generator's, o_proj and down_proj of the upper layers) with next-token
loss on the user's turns, as the paper's own fine-tuning baseline (its SFT row). Measured on the
2-core CPU before this module existed (SmolLM2-135M, 36 held-out questions): the gold answers' NLL
3.39 under the user's own adapter against 9.43 under another user's, 35 of 36 questions in
favour of their own, where the untrained generator's adapter changes nothing.

    texts (the new turns) + replay (a bounded sample of earlier turns)
      │ windows of `window_tokens`, trained `steps` AdamW steps from the previous pair
      ▼
    AdapterState.pairs: module name -> (lora_A (r, d_in), lora_B (d_out, r)), scaling folded into B

A compression continues from the previous pairs, so its cost grows with the new tokens and the
replay, not with the whole history; the replay keeps earlier facts from being overwritten.
Deterministic for a given state, texts and seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .model import GenerativeAdapterModel, RowAdapters, zero_pair
from .state import AdapterState


@dataclass(frozen=True)
class FinetuneConfig:
    """How a user's LoRA pair is trained (see the module docstring)."""

    # --- the adapter
    rank: int = 8
    """Rank of each module's LoRA pair."""
    alpha: float = 16.0
    """scaling = alpha / rank, as PEFT's lora_alpha."""
    upper_layers: float = 0.5
    """Fraction of the engine's adapted decoder layers trained, the uppermost ones: backward then
    stops halfway down the model (the lower layers run once, without gradients)."""

    # --- training
    steps: int = 8
    """AdamW steps per compression, each over every window of the new turns and the replay."""
    lr: float = 1e-2
    window_tokens: int = 256
    """Tokens per training row: short enough that one row's backward lets replies in soon."""
    replay_tokens: int = 512
    """Most tokens of earlier turns trained again with the new ones (0: none)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.window_tokens < 8 or self.replay_tokens < 0:
            raise ValueError("rank and steps must be >= 1, window_tokens >= 8, replay_tokens >= 0")
        if not 0 < self.upper_layers <= 1 or not self.lr > 0:
            raise ValueError("upper_layers must be in (0, 1] and lr > 0")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class FinetuneCompressor:
    """Writes a user's turns into their LoRA pairs by fine-tuning, on one engine's frozen model
    (an adapter_core.compressor.Compressor)."""

    name = "finetune"

    def __init__(self, engine: GenerativeAdapterModel, config: FinetuneConfig | None = None) -> None:
        self.engine = engine
        self.config = config or FinetuneConfig()
        layers = sorted({engine.layer_index[name] for name in engine.adapted})
        first = layers[len(layers) - max(1, math.ceil(len(layers) * self.config.upper_layers))]
        self.modules = [name for name in engine.adapted if engine.layer_index[name] >= first]
        """The adapted modules that get a pair (the others add nothing)."""
        payload = json.dumps(asdict(self.config), sort_keys=True) + "|" + ",".join(self.modules)
        self.id = "finetune-" + hashlib.sha256(payload.encode()).hexdigest()[:16]
        """What made a state: a state of another compressor (or other settings) is rebuilt."""
        self.replay_tokens = self.config.replay_tokens

    def empty_state(self) -> AdapterState:
        """No pairs yet: the base model."""
        return AdapterState(sums={}, generator_id=self.id, base_model_id=self.engine.base_model_id, pairs={})

    def absorb(self, state: AdapterState, texts: Sequence[str] | str, replay: Sequence[str] = (),
               pause: Callable[[], None] | None = None) -> AdapterState:
        """A new state whose pairs were trained further on `texts` (and `replay`, earlier turns
        trained again); the old state is left as it is. pause: called before each decoder layer of
        each forward and before each backward, where the caller may decode other replies."""
        state.check_compatible(self.id, self.engine.base_model_id)
        texts = [texts] if isinstance(texts, str) else list(texts)
        new_windows = self._windows(texts)
        windows = new_windows + self._windows(list(replay))
        if not new_windows:
            return state
        params = self._start_params(state)
        trainable = [t for pair in params.values() for t in pair]
        optimizer = torch.optim.AdamW(trainable, lr=self.config.lr, weight_decay=0.0)
        losses = []
        with torch.enable_grad():
            for _ in range(self.config.steps):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for ids in windows:
                    loss = self._loss(ids, params, pause) * (len(ids) / sum(len(w) for w in windows))
                    if pause is not None:
                        pause()
                    loss.backward()
                    total += float(loss.detach())
                optimizer.step()
                losses.append(round(total, 4))
        pairs = {name: (a.detach().cpu().clone(), (b.detach() * self.config.scaling).cpu())
                 for name, (a, b) in params.items()}
        tokens = sum(len(w) for w in new_windows)
        return AdapterState(sums={}, generator_id=self.id, base_model_id=state.base_model_id,
                            tokens=state.tokens + tokens, windows=state.windows + len(new_windows),
                            extra={**state.extra, "losses": json.dumps(losses)}, pairs=pairs)

    # --- training -------------------------------------------------------------------------------

    def _windows(self, texts: list[str]) -> list[list[int]]:
        """The texts' tokens in windows of window_tokens (a text shorter than 2 tokens teaches nothing)."""
        tok, size = self.engine.tokenizer, self.config.window_tokens
        windows = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            windows += [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) > 1]
        return windows

    def _start_params(self, state: AdapterState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The previous pairs, or new ones: lora_A random (as PEFT's Kaiming-uniform), lora_B zero,
        so that a new adapter starts as the base model. Seeded: the same history gives the same pairs."""
        gen = torch.Generator().manual_seed(self.config.seed)
        params = {}
        for name in self.modules:
            layer = self.engine.adapted[name]
            if name in state.pairs:
                a, b = state.pairs[name][0].clone().float(), state.pairs[name][1].float() / self.config.scaling
            else:
                d_in, d_out = layer.base_layer.in_features, layer.base_layer.out_features
                bound = 1 / math.sqrt(d_in)
                a = (torch.rand(self.config.rank, d_in, generator=gen) * 2 - 1) * bound  # (r, d_in)
                b = torch.zeros(d_out, self.config.rank)  # (d_out, r), scaling folded in
            params[name] = (a.to(self.engine.device).requires_grad_(), b.to(self.engine.device).requires_grad_())
        return params

    def _loss(self, ids: list[int], params: dict[str, tuple[torch.Tensor, torch.Tensor]],
              pause: Callable[[], None] | None) -> torch.Tensor:
        """Next-token loss of one window (1, T) under the pairs being trained."""
        engine = self.engine
        x = torch.tensor([ids], device=engine.device)  # (1, T)
        folded = {name: (a, b * self.config.scaling) for name, (a, b) in params.items()}
        zero = {name: zero_pair(engine.adapted[name]) for name in engine.adapted if name not in folded}
        with engine.applying(RowAdapters(folded=folded | zero), pause):
            logits = engine.base_model(input_ids=x).logits  # (1, T, V)
        return F.cross_entropy(logits[0, :-1].float(), x[0, 1:])


def replay_sample(texts: Sequence[str], tokens: int, tokenizer, seed: int) -> list[str]:
    """Earlier turns to train again, at most `tokens` tokens, drawn evenly over the whole history
    with a seeded shuffle (the oldest facts are as likely to come back as the newest)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        n = len(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if total + n > tokens:
            continue
        chosen.append(i)
        total += n
    return [texts[i] for i in sorted(chosen)]
