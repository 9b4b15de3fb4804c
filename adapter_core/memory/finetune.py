"""The second compressor: a LoRA pair per user, fine-tuned on that user's own chat.

The generator (adapter_core.memory.model) writes memory in one forward pass, but only once it is trained,
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

import functools
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import restatement
from ..data.conversation import LINE_STARTS, prompt_ids
from ..serving.decoding import ReplyRequest, reply
from .model import GenerativeAdapterModel, RowAdapters, decoder_layers, zero_pair
from ..serving.sampling import SamplingConfig
from .state import AdapterState


ANCHOR_REQUESTS = (
    "How do I keep basil fresh for a week?",
    "Explain in a few sentences why the sky is blue.",
    "Suggest a short walking route plan for a rainy Sunday.",
    "What should I pack for a two-day train trip?",
)
"""Everyday requests whose replies, written by the base model itself, anchor the fine-tuning."""


LOSS_ON = ("user", "all")
"""What FinetuneConfig.loss_on may be."""


LOWER_KEPT_WINDOWS = 64
"""Most windows whose frozen layers' output a compression keeps (64 x 256 tokens x 576 fp32 for
SmolLM2-135M: 38 MB); a longer one, a rebuild of a long history, recomputes it at each use."""

Progress = Callable[[int, int], None]
"""Told (steps done, steps in all) as a compression goes: at its start and after each step."""



@dataclass(frozen=True)
class Window:
    """One training row."""

    ids: list[int]
    """Its tokens (at most window_tokens)."""
    taught: list[int]
    """Positions i whose next token ids[i + 1] the loss counts (see FinetuneConfig.loss_on)."""

    @classmethod
    def of(cls, ids: list[int], counted: list[bool]) -> Window | None:
        """The window of `ids` whose loss counts the tokens marked in `counted`; None if it counts none
        (its first token has no context to be predicted from)."""
        taught = [i for i in range(len(ids) - 1) if counted[i + 1]]
        return cls(ids, taught) if taught else None


@dataclass(frozen=True)
class Anchor:
    """Text the base model wrote itself, and what the base model predicts there."""

    ids: torch.Tensor
    """(1, T) its tokens."""
    hidden: torch.Tensor
    """(1, T, D) its hidden states entering the first trained layer."""
    logprobs: torch.Tensor
    """(T, V) the base model's log-probabilities of each next token."""


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
    steps: int = 12
    """AdamW steps per compression at least; more when its windows need them (see min_passes). 12
    rather than 8 with the 1,024-token anchor: at 10 facts the answer NLL fell from 4.49 to 3.48, the
    full history's being 3.25 (docs/memory/README.md)."""
    lr: float = 1e-2
    window_tokens: int = 256
    """Tokens per training row: short enough that one row's backward lets replies in soon."""
    batch_tokens: int = 1024
    """Most tokens of windows per step: a compression of few new tokens trains on all of them at
    every step, one of many on a seeded shuffle of them, step after step (the cost per step is
    bounded, so a long compression costs passes over its windows, not steps times its windows)."""
    min_passes: int = 2
    """Every window is trained at least this many times (a compression with many windows takes
    more than `steps` steps)."""
    replay_tokens: int = 512
    """Most tokens of earlier turns trained again with the new ones (0: none)."""
    anchor_weight: float = 8.0
    """Weight of the anchor loss: KL from the base model to the adapted one on text the base model
    wrote itself (see FinetuneCompressor.anchor), so that the adapter changes what the user's turns
    need and leaves the model's ordinary replies alone (0: no anchor). 8 rather than 3 with the
    recall questions: unrelated text 1.04-1.05x the base model's perplexity instead of 1.14-1.16x,
    the answer NLL still below the full history's (docs/memory/README.md)."""
    anchor_tokens: int = 1024
    """Tokens of that text (the base model's replies to a few everyday requests, made once), all of
    them in every step's anchor loss. More steps need more of it: at 12 steps, 256 tokens let
    unrelated text's perplexity rise to 1.15x the base model's, 1,024 kept it at 1.09x (taking one
    reply per step in turn instead, at 16 steps, was worse than 256 at every step on both counts:
    docs/memory/README.md)."""
    # --- what it learns from
    recall: str = "questions"
    """Also train on recall chats made from the user's statements, in the chat format a question
    comes in (adapter_core.memory.restatement.RECALLS): "none"; "restate", a general question
    answered with the statement said back; "questions", a question the base model writes about
    each statement (a generation per statement in every compression) answered with the value it
    copies, then the statement said back; "both". Measured in docs/memory/README.md: "questions"
    brought the answer NLL below the full history's."""
    loss_on: str = "user"
    """Which tokens the next-token loss counts: "user", those of the user's lines (the assistant's
    replies stay context: they are the model's own words, and what the user said is what to
    remember; text with no user lines, e.g. a named transcript, counts whole), or "all"."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.window_tokens < 8 or self.replay_tokens < 0:
            raise ValueError("rank and steps must be >= 1, window_tokens >= 8, replay_tokens >= 0")
        if self.batch_tokens < self.window_tokens or self.min_passes < 1:
            raise ValueError("batch_tokens must be >= window_tokens and min_passes >= 1")
        if self.recall not in restatement.RECALLS:
            raise ValueError(f"recall must be one of {restatement.RECALLS}")
        if self.loss_on not in LOSS_ON:
            raise ValueError("loss_on must be 'user' or 'all'")
        if not 0 < self.upper_layers <= 1 or not self.lr > 0 or self.anchor_weight < 0:
            raise ValueError("upper_layers must be in (0, 1], lr > 0 and anchor_weight >= 0")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class FinetuneCompressor:
    """Writes a user's turns into their LoRA pairs by fine-tuning, on one engine's frozen model
    (an adapter_core.memory.compressor.Compressor)."""

    name = "finetune"

    def __init__(self, engine: GenerativeAdapterModel, config: FinetuneConfig | None = None) -> None:
        self.engine = engine
        self.config = config or FinetuneConfig()
        layers = sorted({engine.layer_index[name] for name in engine.adapted})
        self.first_layer = layers[len(layers) - max(1, math.ceil(len(layers) * self.config.upper_layers))]
        """The lowest decoder layer with a trained pair: the layers below it are frozen and see no
        adapter, so they run once per window and compression instead of once per step."""
        self.modules = [name for name in engine.adapted if engine.layer_index[name] >= self.first_layer]
        """The adapted modules that get a pair (the others add nothing)."""
        payload = json.dumps(asdict(self.config), sort_keys=True) + "|" + ",".join(self.modules)
        self.id = "finetune-" + hashlib.sha256(payload.encode()).hexdigest()[:16]
        """What made a state: a state of another compressor (or other settings) is rebuilt."""
        self.replay_tokens = self.config.replay_tokens
        self._anchor: Anchor | None = None
        self._untrained = {name: tuple(t.to(engine.device) for t in zero_pair(layer))
                           for name, layer in engine.adapted.items() if name not in self.modules}
        """Pairs of zeros for the adapted modules it trains none on (every module needs one in a call)."""

    def empty_state(self) -> AdapterState:
        """No pairs yet: the base model."""
        return AdapterState(sums={}, generator_id=self.id, base_model_id=self.engine.base_model_id, pairs={})

    def absorb(self, state: AdapterState, texts: Sequence[str] | str, replay: Sequence[str] = (),
               pause: Callable[[], None] | None = None, progress: Progress | None = None) -> AdapterState:
        """A new state whose pairs were trained further on `texts` (and `replay`, earlier turns
        trained again); the old state is left as it is. pause: called before each decoder layer of
        each forward and before each backward, where the caller may decode other replies; progress:
        told (steps done, steps in all) at the start and after each step."""
        state.check_compatible(self.id, self.engine.base_model_id)
        texts = [texts] if isinstance(texts, str) else list(texts)
        new_windows = self._windows(texts)
        if not new_windows:
            return state
        windows = new_windows + self._windows(["".join(replay)])  # the sampled turns, packed into full windows
        if self.config.recall != "none":
            windows += self._recall_windows([*texts, *replay], pause)
        anchor = self.anchor() if self.config.anchor_weight else None
        # the frozen layers' output, (1, T, D) per window, kept for the compression's steps; a
        # rebuild of a long history would keep too much: beyond LOWER_KEPT_WINDOWS it is recomputed
        lower = [self._lower(w.ids, pause) for w in windows] if len(windows) <= LOWER_KEPT_WINDOWS else None
        params = self._start_params(state)
        trainable = [t for pair in params.values() for t in pair]
        optimizer = torch.optim.AdamW(trainable, lr=self.config.lr, weight_decay=0.0)
        losses, batches = [], self._batches(len(windows))
        if progress is not None:
            progress(0, len(batches))
        with torch.enable_grad():
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                total, taught = 0.0, sum(len(windows[i].taught) for i in batch)
                for i in batch:
                    hidden = lower[i] if lower is not None else self._lower(windows[i].ids, pause)
                    loss = self._loss(windows[i], hidden, params, pause) * (len(windows[i].taught) / taught)
                    total += self._backward(loss, pause)
                if anchor is not None:
                    total += self._backward(self.config.anchor_weight * self._anchor_loss(anchor, params, pause), pause)
                optimizer.step()
                losses.append(round(total, 4))
                if progress is not None:
                    progress(len(losses), len(batches))
        pairs = {name: (a.detach().cpu().clone(), (b.detach() * self.config.scaling).cpu())
                 for name, (a, b) in params.items()}
        tokens = sum(len(w.ids) for w in new_windows)
        return AdapterState(sums={}, generator_id=self.id, base_model_id=state.base_model_id,
                            tokens=state.tokens + tokens, windows=state.windows + len(new_windows),
                            extra={**state.extra, "losses": json.dumps(losses)}, pairs=pairs)

    # --- training -------------------------------------------------------------------------------

    def _windows(self, texts: list[str]) -> list[Window]:
        """The texts' tokens in windows of window_tokens; a window with nothing to teach is left out."""
        size = self.config.window_tokens
        windows = []
        for text in texts:
            ids, counted = self._tokens(text)
            windows += [Window.of(ids[start:start + size], counted[start:start + size]) for start in range(0, len(ids), size)]
        return [w for w in windows if w is not None]

    def _recall_windows(self, texts: list[str], pause: Callable[[], None] | None = None) -> list[Window]:
        """Recall chats of the texts' statements, a window each (adapter_core.memory.restatement); the
        loss counts the assistant's words."""
        said = [s for text in texts for s in restatement.statements(text)]
        write = functools.partial(self._write, pause=pause) if self.config.recall in ("questions", "both") else None
        exchanges = restatement.recall_exchanges(said, restatement.written_questions(said, write), self.config.seed,
                                                 self.config.recall)
        size, windows = self.config.window_tokens, []
        def fits(chat: list[dict]) -> bool:
            return len(self.engine.tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]) <= size

        for chat in restatement.recall_chats(exchanges, fits):
            ids, counted = restatement.chat_tokens(self.engine.tokenizer, chat)
            windows.append(Window.of(ids[:size], counted[:size]))
        return [w for w in windows if w is not None]

    def _write(self, prompts: list[str], pause: Callable[[], None] | None = None) -> list[str]:
        """The base model's greedy continuation of each prompt (plain text, no chat template);
        pause: called before each decode step."""
        tok = self.engine.tokenizer
        # a question and its answer fit in 24 tokens; the blank line after them ends the example
        newline = tuple(tok("\n", add_special_tokens=False)["input_ids"])
        blank_line = tuple(tok("\n\n", add_special_tokens=False)["input_ids"])  # one token, or two newlines
        greedy = SamplingConfig.greedy(max_new_tokens=24, stop_sequences=(blank_line, newline + newline))
        requests = [ReplyRequest(tok(p, add_special_tokens=False)["input_ids"], None, greedy) for p in prompts]
        return [r.text for r in reply(self.engine, requests, max_rows=len(requests), pause=pause)]

    def _tokens(self, text: str) -> tuple[list[int], list[bool]]:
        """The text's tokens, and whether the loss counts each (loss_on "user": the tokens of the
        user's lines, a line being its speaker's until another speaker's line begins)."""
        tok = self.engine.tokenizer
        lines = text.splitlines(keepends=True)
        speakers = [next((role for role, start in LINE_STARTS.items() if line.startswith(start)), None) for line in lines]
        if self.config.loss_on == "all" or "user" not in speakers:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return ids, [True] * len(ids)
        ids, counted, role = [], [], None
        for line, speaker in zip(lines, speakers):
            role = speaker or role
            line_ids = tok(line, add_special_tokens=False)["input_ids"]
            ids += line_ids
            counted += [role == "user"] * len(line_ids)
        return ids, counted

    def _batches(self, count: int) -> list[list[int]]:
        """The windows (indices of `count`) trained at each step: all of them while they fit in
        batch_tokens, else passes over the windows, each a seeded shuffle cut into steps, until
        every window was trained min_passes times and at least `steps` steps were taken."""
        per_step = max(1, self.config.batch_tokens // self.config.window_tokens)
        if count <= per_step:
            return [list(range(count))] * max(self.config.steps, self.config.min_passes)
        gen, batches, passes = random.Random(self.config.seed), [], 0
        while passes < self.config.min_passes or len(batches) < self.config.steps:
            order = list(range(count))
            gen.shuffle(order)
            batches += [sorted(order[i:i + per_step]) for i in range(0, count, per_step)]
            passes += 1
        return batches

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

    @staticmethod
    def _backward(loss: torch.Tensor, pause: Callable[[], None] | None) -> float:
        if pause is not None:  # a window's backward is the longest stretch without a pause
            pause()
        loss.backward()
        return float(loss.detach())

    # The model in two parts: layers below first_layer once per window, the rest once per step.

    def _lower(self, ids: list[int], pause: Callable[[], None] | None) -> torch.Tensor:
        """Hidden states (1, T, D) of a window's T ids entering first_layer, without gradients."""
        decoder = self.engine.base_model.get_decoder()
        x = torch.tensor([ids], device=self.engine.device)  # (1, T)
        with torch.no_grad(), self.engine.applying(None, pause):
            return self._through(decoder.embed_tokens(x), decoder_layers(self.engine.base_model)[:self.first_layer])

    def _logits(self, hidden: torch.Tensor, params: dict[str, tuple[torch.Tensor, torch.Tensor]],
                pause: Callable[[], None] | None, positions: list[int] | None = None) -> torch.Tensor:
        """Logits (P, V) at `positions` (None: all T) of a window whose hidden states (1, T, D)
        entering first_layer are given, under the pairs being trained. The output layer, a third
        of a step's work, runs on those positions only."""
        model = self.engine.base_model
        folded = {name: (a, b * self.config.scaling) for name, (a, b) in params.items()}
        with self.engine.applying(RowAdapters(folded=folded | self._untrained), pause):
            h = model.get_decoder().norm(self._through(hidden, decoder_layers(model)[self.first_layer:]))[0]  # (T, D)
            return model.lm_head(h if positions is None else h[positions]).float()  # (P, V)

    def _through(self, h: torch.Tensor, layers) -> torch.Tensor:
        """h (1, T, D) through decoder layers, causally from position 0, as the model's own forward."""
        positions = torch.arange(h.shape[1], device=h.device)[None]  # (1, T)
        rotary = self.engine.base_model.get_decoder().rotary_emb(h, positions)  # (cos, sin)
        mask = None  # sdpa and flash attention are causal without one
        if self.engine.base_model.config._attn_implementation == "eager":
            mask = torch.full((h.shape[1], h.shape[1]), torch.finfo(h.dtype).min, device=h.device).triu(1)[None, None]
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return h

    def _loss(self, window: Window, hidden: torch.Tensor, params: dict[str, tuple[torch.Tensor, torch.Tensor]],
              pause: Callable[[], None] | None) -> torch.Tensor:
        """Next-token loss of one window's taught tokens (hidden: its states entering first_layer)."""
        targets = torch.tensor([window.ids[i + 1] for i in window.taught], device=self.engine.device)  # (P,)
        return F.cross_entropy(self._logits(hidden, params, pause, window.taught), targets)

    def _anchor_loss(self, anchor: Anchor, params: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     pause: Callable[[], None] | None) -> torch.Tensor:
        """KL(base || adapted) per token on the anchor text: zero while the adapter leaves it alone."""
        adapted = F.log_softmax(self._logits(anchor.hidden, params, pause), dim=-1)  # (T, V)
        return F.kl_div(adapted, anchor.logprobs, log_target=True, reduction="batchmean")

    def anchor(self) -> Anchor:
        """Text the base model writes itself (its replies to a few everyday requests, seeded) and
        its own log-probabilities there, made once per compressor: what an adapter should not change.
        Not the evaluation's neutral text (adapter_core/evaluation/neutral.txt), which measures it."""
        if self._anchor is None:
            engine, tok = self.engine, self.engine.tokenizer
            per = max(16, self.config.anchor_tokens // len(ANCHOR_REQUESTS))
            requests = [ReplyRequest(prompt_ids(tok, text), None, SamplingConfig(max_new_tokens=per), seed=i)
                        for i, text in enumerate(ANCHOR_REQUESTS)]
            ids = []
            for request, answer in zip(requests, reply(engine, requests)):
                ids += list(request.prompt[-8:]) + list(answer.tokens)  # the request's end, then the reply
            x = torch.tensor([ids[:self.config.anchor_tokens]], device=engine.device)  # (1, T)
            with torch.inference_mode():
                base = F.log_softmax(engine.base_model(input_ids=x).logits[0].float(), dim=-1)  # (T, V)
            self._anchor = Anchor(ids=x, hidden=self._lower(x[0].tolist(), None), logprobs=base.clone())
        return self._anchor


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
