"""GenerativeAdapterModel: a frozen causal LM plus the generator that writes per-user adapters.

Two kinds of call:

* answering (`forward`, the `adapters` and `applying` contexts): row i of the batch is adapted
  by `states[i]` (or by nothing when it is None); M = normalize(S) is fixed for the whole call.
  A single row folds M into a plain LoRA pair once, instead of a batched product per layer and
  token. Replies are decoded by adapter_core.serving.decoding (and served by adapter_core.serving.scheduler).
* writing memory (`absorb`, `absorb_many`, and the training `loss`, both through one private
  memory pass): the text is cut into windows, each window is one row of the batch, encoded with
  positions starting at 0, so windows never attend to each other. At every adapted decoder layer
  a pre-hook sums k_t v_t^T over each window's written tokens (the write mask) and gives window j
  the memory of the prior state plus the windows before j. One pass over W windows therefore
  equals W sequential absorptions, and information crosses windows only through the adapter.

The memory pass over U users x W windows (s_uj: the k v^T sums of window j of user u):

               window 0          window 1                  window W-1
    user 0   row 0          ->  row 1              -> ...  row W-1                       => total[0]
             M(prior[0])        M(prior[0] + s_00)         M(prior[0] + s_00 + .. + s_0,W-2)
    user 1   row W          ->  row W+1            -> ...  row 2W-1                      => total[1]
    ...
    row u*W + j reads M = normalize(prior[u] + s_u0 + .. + s_u,j-1)   (rows user-major)
    total[u] = prior[u] + s_u0 + .. + s_u,W-1                          (the user's new sums)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_sharded, save_sharded, tensor_digest
from .config import ConfigError, GeneratorConfig, find_target
from .layer import AdapterLinear
from .normalize import normalize
from .state import AdapterState
from .windows import IGNORE, PackedWindows, TrainingBatch, Window, pack_windows

CONFIG_NAME = "generator_config.json"

# What absorb() accepts: one text, several texts, or several lists of token ids.
Texts = str | Sequence[str] | Sequence[Sequence[int]]


@dataclass
class _MemoryPass:
    """Bookkeeping of one memory pass over U users x W windows (rows ordered user-major)."""

    prior: dict[str, torch.Tensor]  # module name -> (U, r, r) fp32
    write_mask: torch.Tensor  # (U*W, T); 1 where a token is written into memory
    users: int
    windows: int
    totals: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> (U, r, r)
    pause: Callable[[], None] | None = None  # called before each adapted decoder layer (see absorb)


@dataclass(frozen=True)
class UserAdapter:
    """One user's adapter as the adapted layers apply it (GenerativeAdapterModel.user_adapter): the
    memories M that the generator's lora_A and lora_B read, or a fine-tuned LoRA pair per module."""

    memory: dict[str, torch.Tensor] | None = None
    """module name -> M (r, r): a generator's state, normalized."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """module name -> (lora_A (r, d_in), lora_B (d_out, r)), scaling folded in: a fine-tuned state
    (adapter_core.memory.finetune), every adapted module (a pair of zeros where it trained none)."""


@dataclass(frozen=True)
class RowAdapters:
    """The adapters of a batch's rows as the adapted layers apply them (see `row_adapters`): one of
    the three is set."""

    memory: dict[str, torch.Tensor] | None = None
    """module name -> (N, r, r): row i's normalized memory M (zeros: the base model)."""
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """module name -> (lora_A (r, d_in), lora_B (d_out, r)): one row's adapter as one LoRA pair."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """module name -> (lora_A (N, R, d_in), lora_B (N, d_out, R)): row i's own LoRA pair, ranks
    padded with zeros to the largest R; for batches where some row's adapter is fine-tuned."""


def decoder_layers(base_model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a Hugging Face causal LM (Llama, Mistral, Qwen2, ...)."""
    decoder = base_model.get_decoder() if hasattr(base_model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"cannot find the decoder layers of {type(base_model).__name__}")
    return layers


class GenerativeAdapterModel(nn.Module):
    def __init__(self, base_model: nn.Module, config: GeneratorConfig, base_model_id: str, tokenizer=None):
        super().__init__()
        self.config = config
        self.base_model = base_model
        self.base_model_id = base_model_id
        self.tokenizer = tokenizer
        base_model.requires_grad_(False)
        layers = decoder_layers(base_model)
        config.validate_for(layers)
        hidden_size = base_model.config.hidden_size
        layer_names = {id(layer): name for name, layer in base_model.named_modules()}
        init = torch.Generator().manual_seed(config.seed)

        self.adapted: dict[str, AdapterLinear] = {}  # full module name -> layer, in model order
        self.layer_index: dict[str, int] = {}  # full module name -> index of its decoder layer
        self._by_layer: dict[int, list[tuple[str, AdapterLinear]]] = {}
        for i in config.layer_indices(len(layers)):
            layer = layers[i]
            for target in config.target_modules:
                relative_name, _ = find_target(layer, target, i)
                parent_name, _, attr = relative_name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                wrapped = AdapterLinear(getattr(parent, attr), hidden_size, config.rank, config.scale,
                                        config.init_std, config.torch_dtype, init)
                setattr(parent, attr, wrapped)
                name = f"{layer_names[id(layer)]}.{relative_name}"
                self.adapted[name] = wrapped
                self.layer_index[name] = i
                self._by_layer.setdefault(i, []).append((name, wrapped))
            layer.register_forward_pre_hook(self._hook_for(i), with_kwargs=True)

        for layer in layers:  # every layer, adapted or not: see applying's pause
            layer.register_forward_pre_hook(self._pausing_hook)

        self.checkpoint_meta: dict | None = None
        """What the loaded checkpoint says of itself (None: a freshly initialised, untrained generator)."""
        self._pass: _MemoryPass | None = None
        self._pausing: tuple[Callable[[], None], RowAdapters | None] | None = None  # see applying's pause
        # The per-row memories live on the layers during a call, so calls must not interleave.
        self._lock = threading.RLock()
        self.generator_id = self.compute_generator_id()

    # --- identity and checkpoints ----------------------------------------------------------------

    def generator_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{p_name}": p for name, layer in self.adapted.items()
                for p_name, p in layer.generator_parameters().items()}

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator_state_dict().values())

    def compute_generator_id(self) -> str:
        """A content hash of config and weights: states made by other weights are refused."""
        payload = self.config.to_json() + tensor_digest(self.generator_state_dict())
        return "gen-" + hashlib.sha256(payload.encode()).hexdigest()[:16]

    def save_generator(self, folder: str | Path, extra: dict | None = None) -> None:
        """Write config + sharded weights; call after training so the id matches the weights."""
        self.generator_id = self.compute_generator_id()
        folder = Path(folder)
        save_sharded(self.generator_state_dict(), folder)
        meta = {"config": self.config.to_dict(), "base_model_id": self.base_model_id,
                "generator_id": self.generator_id, **(extra or {})}
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def from_checkpoint(cls, base_model: nn.Module, folder: str | Path, base_model_id: str,
                        tokenizer=None, allow_other_base: bool = False) -> "GenerativeAdapterModel":
        folder = Path(folder)
        if not (folder / CONFIG_NAME).exists():
            raise FileNotFoundError(f"no generator checkpoint in {folder} (missing {CONFIG_NAME})")
        meta = json.loads((folder / CONFIG_NAME).read_text())
        if meta["base_model_id"] != base_model_id and not allow_other_base:
            raise ConfigError(
                f"generator in {folder} was trained for base model {meta['base_model_id']!r}, "
                f"not {base_model_id!r}"
            )
        engine = cls(base_model, GeneratorConfig.from_dict(meta["config"]), base_model_id, tokenizer)
        engine.load_generator_weights(folder)
        engine.checkpoint_meta = meta
        return engine

    def load_generator_weights(self, folder: str | Path) -> None:
        """Copy a checkpoint's weights into this generator (same config), e.g. to resume training."""
        tensors = load_sharded(folder)
        own = self.generator_state_dict()
        if set(tensors) != set(own):
            missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ConfigError(f"checkpoint does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, p in own.items():
                if p.shape != tensors[name].shape:
                    raise ConfigError(f"{name}: checkpoint shape {tuple(tensors[name].shape)} != {tuple(p.shape)}")
                p.copy_(tensors[name])
        self.generator_id = self.compute_generator_id()

    # --- states ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def empty_state(self) -> AdapterState:
        r = self.config.rank
        return AdapterState(sums={name: torch.zeros(r, r) for name in self.adapted},
                            generator_id=self.generator_id, base_model_id=self.base_model_id)

    def _check_state(self, state: AdapterState) -> None:
        state.check_compatible(self.generator_id, self.base_model_id)
        if set(state.sums) != set(self.adapted):
            raise ConfigError("state's modules do not match the adapted modules")

    def memory_matrices(self, state: AdapterState) -> dict[str, torch.Tensor]:
        """M = normalize(S) for every adapted module, (r, r) fp32: what the adapter applies."""
        self._check_state(state)
        names = list(state.sums)
        stacked = torch.stack([state.sums[name] for name in names])  # (modules, r, r): one batched call
        return dict(zip(names, normalize(stacked, self.config.normalization, self.config.polar_steps)))

    # --- answering -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def adapters(self, states: Sequence[AdapterState | None] | None) -> Iterator[None]:
        """Within the block, row i of every batch is adapted by states[i] (None: base model)."""
        with self.applying(self.row_adapters([None if s is None else self.user_adapter(s) for s in states or []])):
            yield

    def user_adapter(self, state: AdapterState) -> UserAdapter:
        """What a state applies: M = normalize(S) per module for the generator's, the LoRA pairs
        (and pairs of zeros for the modules without one) for a fine-tuned one."""
        if state.sums or not state.pairs:
            return UserAdapter(memory=self.memory_matrices(state))
        if state.base_model_id != self.base_model_id or not set(state.pairs) <= set(self.adapted):
            raise ConfigError("a fine-tuned state made for another base model or other modules")
        return UserAdapter(pairs={name: state.pairs.get(name) or zero_pair(layer)
                                  for name, layer in self.adapted.items()})

    def row_adapters(self, adapters: Sequence[UserAdapter | None]) -> RowAdapters | None:
        """What `applying` sets for a batch whose row i has adapters[i] (from user_adapter; None:
        the base model). None when no row has one. A single row is one plain LoRA pair per module
        (AdapterLinear.folded_pair), cheaper than the per-row product, unless gradients are on; rows
        that are all the generator's are memories between its shared lora_A and lora_B; otherwise
        every row is its own LoRA pair (a generator's M as its exact pair, AdapterLinear.lora_pair)."""
        if not any(a is not None for a in adapters):
            return None
        if len(adapters) == 1 and not torch.is_grad_enabled():
            only = adapters[0]
            if only.pairs is not None:
                return RowAdapters(folded={name: (a.to(self.device), b.to(self.device))
                                           for name, (a, b) in only.pairs.items()})
            return RowAdapters(folded={name: layer.folded_pair(only.memory[name])
                                       for name, layer in self.adapted.items()})
        if all(a is None or a.memory is not None for a in adapters):
            zero = torch.zeros(self.config.rank, self.config.rank)  # M = 0 adds nothing: the base model
            return RowAdapters(memory={
                name: torch.stack([zero if a is None else a.memory[name] for a in adapters]).to(self.device)
                for name in self.adapted})  # (N, r, r) each
        pairs = {}
        for name, layer in self.adapted.items():
            rows = [zero_pair(layer) if a is None else a.pairs[name] if a.pairs is not None
                    else layer.lora_pair(a.memory[name]) for a in adapters]
            rank = max(pair[0].shape[0] for pair in rows)
            lora_a = torch.stack([F.pad(a.float(), (0, 0, 0, rank - a.shape[0])) for a, _ in rows])  # (N, R, d_in)
            lora_b = torch.stack([F.pad(b.float(), (0, rank - b.shape[1])) for _, b in rows])  # (N, d_out, R)
            pairs[name] = (lora_a.to(self.device), lora_b.to(self.device))
        return RowAdapters(pairs=pairs)

    @contextlib.contextmanager
    def applying(self, adapters: RowAdapters | None, pause: Callable[[], None] | None = None) -> Iterator[None]:
        """Within the block, every batch is adapted row by row as `adapters` says (None: base model).

        pause: called before each decoder layer of the forwards inside the block, where the caller
        may run other forwards of this model (the inference loop decodes other replies while a
        long prompt is prefilled): the layers hold no adapters while it runs, and these ones
        again after it; forwards run during the pause do not pause."""
        with self._lock:  # held even without adapters: an absorb in another thread sets memories
            # a memory pass paused between layers (see absorb's pause) leaves its memories on the
            # layers it went through: this call must not read them
            self._clear_memories()
            self._set_adapters(adapters)
            outer, self._pausing = self._pausing, None if pause is None else (pause, adapters)
            try:
                yield
            finally:
                self._pausing = outer
                self._clear_memories()

    def _set_adapters(self, adapters: RowAdapters | None) -> None:
        if adapters is None:
            return
        for name, layer in self.adapted.items():
            if adapters.folded is not None:
                layer.folded = adapters.folded[name]
            elif adapters.pairs is not None:
                layer.pairs = adapters.pairs[name]
            else:
                layer.memory = adapters.memory[name]

    def _pausing_hook(self, _module, _args) -> None:
        held = self._pausing
        if held is None:
            return
        pause, adapters = held
        self._pausing = None  # what runs during the pause is not paused, and sees no adapters of this call
        self._clear_memories()
        try:
            pause()
        finally:
            self._clear_memories()
            self._set_adapters(adapters)
            self._pausing = held

    @contextlib.contextmanager
    def reading(self, sums: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> Iterator[None]:
        """Within the block, row i of every batch is adapted by M = normalize(sums[...][rows[i]]).

        sums: module name -> (U, r, r) memory sums of U users; rows: (N,) the user of each row
        (None: row i is user i). Differentiable: training reads the sums of a memory pass with it.
        """
        memory = {}
        for name, total in sums.items():
            m = normalize(total.to(self.device), self.config.normalization, self.config.polar_steps)  # (U, r, r)
            memory[name] = m if rows is None else m[rows.to(self.device)]  # (N, r, r)
        with self.applying(RowAdapters(memory=memory)):
            yield

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                states: Sequence[AdapterState | None] | None = None, **kwargs):
        """Logits of the frozen model, row i adapted by states[i]. Left padding is handled."""
        if attention_mask is not None and "position_ids" not in kwargs:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        self._check_batch(input_ids, states)
        with self.adapters(states):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @staticmethod
    def _check_batch(input_ids: torch.Tensor, states) -> None:
        if states is not None and len(states) != input_ids.shape[0]:
            raise ValueError(f"{len(states)} states for a batch of {input_ids.shape[0]} rows")

    # --- absorbing -------------------------------------------------------------------------------

    def windows_of(self, texts: Texts) -> list[list[int]]:
        """Token windows of at most config.window tokens; each text is split on its own."""
        if isinstance(texts, str):
            texts = [texts]
        token_lists = []
        for text in texts:
            if isinstance(text, str):
                if self.tokenizer is None:
                    raise ValueError("text given but the engine has no tokenizer; pass token ids")
                text = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            token_lists.append([int(t) for t in text])
        w = self.config.window
        return [ids[i:i + w] for ids in token_lists for i in range(0, len(ids), w)]

    @torch.no_grad()
    def absorb(self, state: AdapterState, texts: Texts, windows_per_pass: int = 16,
               pause: Callable[[], None] | None = None) -> AdapterState:
        """A new state that also holds `texts`; the old state is left as it is.

        pause: called before each adapted decoder layer of every pass, where the caller may run
        other work on this engine (adapter_core.serving.scheduler decodes replies there) and return to
        carry on; the pass is unchanged by it, so the state is the same bit for bit.
        """
        return self.absorb_many([state], [texts], windows_per_pass, pause)[0]

    @torch.no_grad()
    def absorb_many(self, states: Sequence[AdapterState], texts_per_user: Sequence[Texts],
                    windows_per_pass: int = 16, pause: Callable[[], None] | None = None) -> list[AdapterState]:
        """absorb() for several users in shared passes (each user's windows stay in order)."""
        if len(states) != len(texts_per_user):
            raise ValueError(f"{len(states)} states but {len(texts_per_user)} lists of texts")
        for state in states:
            self._check_state(state)
        windows = [self.windows_of(t) for t in texts_per_user]
        sums = [dict(s.sums) for s in states]
        longest = max((len(w) for w in windows), default=0)
        for start in range(0, longest, windows_per_pass):
            group = [w[start:start + windows_per_pass] for w in windows]
            active = [u for u, g in enumerate(group) if g]
            packed = pack_windows([[Window(ids) for ids in group[u]] for u in active]).to(self.device)
            prior = {name: torch.stack([sums[u][name] for u in active]) for name in self.adapted}
            _, totals = self._write_memory(packed, prior, pause)
            for j, u in enumerate(active):
                sums[u] = {name: total[j].cpu() for name, total in totals.items()}
        return [
            AdapterState(sums=new_sums, generator_id=s.generator_id, base_model_id=s.base_model_id,
                         tokens=s.tokens + sum(map(len, w)), windows=s.windows + len(w), extra=dict(s.extra))
            for s, new_sums, w in zip(states, sums, windows)
        ]

    # --- training --------------------------------------------------------------------------------

    def loss(self, batch: TrainingBatch) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over the batch's labelled positions, and their count.

        The memory windows go through one memory pass from an empty memory; the queries then read
        the whole memory of their user. Only the labelled positions go through the output layer:
        with a 49K vocabulary, full logits for every window would cost gigabytes.
        """
        batch = batch.to(self.device)
        memory, queries = batch.memory, batch.queries
        r = self.config.rank
        prior = {name: torch.zeros(memory.users, r, r, device=self.device) for name in self.adapted}
        hidden, totals = self._write_memory(memory, prior)  # (U*W, T, D)
        picked = [_labelled(hidden, memory.labels)]
        if queries is not None:
            decoder = self.base_model.get_decoder()
            with self.reading(totals, queries.user):  # each query reads all of its user's memory
                hidden = decoder(input_ids=queries.input_ids, attention_mask=queries.attention_mask,
                                 use_cache=False).last_hidden_state  # (Q, Tq, D)
            picked.append(_labelled(hidden, queries.labels))
        hidden = torch.cat([h for h, _ in picked])  # (n, D)
        targets = torch.cat([t for _, t in picked])  # (n,)
        logits = self.base_model.get_output_embeddings()(hidden)  # (n, V)
        return F.cross_entropy(logits.float(), targets), int(targets.numel())

    # --- the memory pass, shared by absorb and loss --------------------------------------------

    def _write_memory(self, packed: PackedWindows, prior: dict[str, torch.Tensor],
                      pause: Callable[[], None] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward over U*W rows that writes W windows into memory for each of U users.

        prior: module name -> (U, r, r) sums before the first window. Window j of user u (row
        u*W + j) is adapted by prior[u] + the sums of its windows < j (see the module docstring);
        packed.write_mask marks the tokens written. Returns the decoder's last hidden states
        (U*W, T, D) and the totals, module name -> (U, r, r) fp32: prior + all windows. Works with
        gradients (loss) as well as without (absorb).
        """
        users = next(iter(prior.values())).shape[0]
        if users != packed.users or packed.rows % users:
            raise ValueError(f"{packed.rows} rows of {packed.users} users cannot be split among {users} priors")
        p = _MemoryPass(prior={n: s.to(self.device, torch.float32) for n, s in prior.items()},
                        write_mask=packed.write_mask.to(self.device), users=users,
                        windows=packed.rows // users, pause=pause)
        decoder = self.base_model.get_decoder()
        with self._lock:
            self._pass = p
            try:
                hidden = decoder(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                 use_cache=False).last_hidden_state  # (U*W, T, D)
            finally:
                self._pass = None
                self._clear_memories()
        return hidden, p.totals

    def _hook_for(self, layer_index: int):
        def hook(_module, args, kwargs):
            p = self._pass
            if p is None:
                return
            if p.pause is not None:
                self._pass = None  # what runs during the pause (a decode step) is not part of this pass
                try:
                    p.pause()
                finally:
                    self._pass = p
            hidden = args[0] if args else kwargs["hidden_states"]
            self._write_layer_memories(layer_index, hidden)
        return hook

    def _write_layer_memories(self, layer_index: int, hidden: torch.Tensor) -> None:
        p = self._pass
        r = self.config.rank
        for name, layer in self._by_layer[layer_index]:
            sums = layer.context_sums(hidden, p.write_mask).view(p.users, p.windows, r, r)  # (U, W, r, r)
            inclusive = p.prior[name].unsqueeze(1) + sums.cumsum(1)  # (U, W, r, r)
            before = torch.cat([p.prior[name].unsqueeze(1), inclusive[:, :-1]], dim=1)  # (U, W, r, r)
            memory = normalize(before, self.config.normalization, self.config.polar_steps)
            layer.memory = memory.reshape(p.users * p.windows, r, r)
            p.totals[name] = inclusive[:, -1]  # (U, r, r)

    def _clear_memories(self) -> None:
        for layer in self.adapted.values():
            layer.memory = None
            layer.folded = None
            layer.pairs = None


def _labelled(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (n, D) of the positions that predict a labelled token, and those tokens (n,)."""
    targets = labels[:, 1:]  # position t predicts token t+1
    selected = targets != IGNORE
    return hidden[:, :-1][selected], targets[selected]


def zero_pair(layer: AdapterLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-1 LoRA pair of zeros: what a module without an adapter of its own adds."""
    return torch.zeros(1, layer.base_layer.in_features), torch.zeros(layer.base_layer.out_features, 1)
