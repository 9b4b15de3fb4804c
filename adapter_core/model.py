"""GenerativeAdapterModel: a frozen causal LM plus the generator that writes per-user adapters.

Two kinds of call:

* answering (`forward`, `generate`): row i of the batch is adapted by `states[i]` (or by nothing
  when it is None); M = normalize(S) is fixed for the whole call. `generate` for one user folds
  M into a plain LoRA pair once, instead of a batched product per layer and token.
* absorbing (`absorb`, `absorb_many`, and the `memory_pass` context for training): the text is
  cut into windows, each window is one row of the batch, encoded with positions starting at 0,
  so windows never attend to each other. At every adapted decoder layer a pre-hook sums
  k_t v_t^T over each window's tokens and gives window j the memory of the prior state plus the
  windows before j. One pass over W windows therefore equals W sequential absorptions, and
  information crosses windows only through the adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_sharded, save_sharded, tensor_digest
from .config import ConfigError, GeneratorConfig, find_target
from .layer import AdapterLinear
from .normalize import normalize
from .state import AdapterState
from .windows import Window, pack_windows

CONFIG_NAME = "generator_config.json"

# What absorb() accepts: one text, several texts, or several lists of token ids.
Chunks = str | Sequence[str] | Sequence[Sequence[int]]


@dataclass
class _MemoryPass:
    """Bookkeeping of one absorbing pass over U users x W windows (rows ordered user-major)."""

    prior: dict[str, torch.Tensor]  # module name -> (U, r, r) fp32
    token_mask: torch.Tensor  # (U*W, T)
    users: int
    windows: int
    totals: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> (U, r, r)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a Hugging Face causal LM (Llama, Mistral, Qwen2, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}")
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

        self.checkpoint_meta: dict | None = None
        """What the loaded checkpoint says of itself (None: a freshly initialised, untrained generator)."""
        self._pass: _MemoryPass | None = None
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
        model = cls(base_model, GeneratorConfig.from_dict(meta["config"]), base_model_id, tokenizer)
        model.load_generator_weights(folder)
        model.checkpoint_meta = meta
        return model

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
    def adapters(self, states: Sequence[AdapterState | None] | None, fold: bool = False) -> Iterator[None]:
        """Within the block, row i of every batch is adapted by states[i] (None: base model).

        fold: with a single state, fold its memories into plain LoRA pairs (AdapterLinear.fold)
        instead of applying them per row; no gradients flow then.
        """
        states = list(states or [])
        for state in states:
            if state is not None:
                self._check_state(state)
        with self._lock:  # held even without adapters: an absorb in another thread sets memories
            if not any(s is not None for s in states):
                yield
            elif fold and len(states) == 1:
                for name, memory in self.memory_matrices(states[0]).items():
                    self.adapted[name].fold(memory)
                try:
                    yield
                finally:
                    self._clear_memories()
            else:
                zero = torch.zeros(self.config.rank, self.config.rank)
                sums = {name: torch.stack([s.sums[name] if s is not None else zero for s in states])
                        for name in self.adapted}  # (N, r, r); a zero sum is the base model
                with self.reading(sums):
                    yield

    @contextlib.contextmanager
    def reading(self, sums: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> Iterator[None]:
        """Within the block, row i of every batch is adapted by M = normalize(sums[...][rows[i]]).

        sums: module name -> (U, r, r) memory sums of U users; rows: (N,) the user of each row
        (None: row i is user i). Differentiable: training reads the sums of a memory pass with it.
        """
        with self._lock:
            for name, layer in self.adapted.items():
                memory = normalize(sums[name].to(self.device), self.config.normalization, self.config.polar_steps)
                layer.memory = memory if rows is None else memory[rows.to(self.device)]  # (N, r, r)
            try:
                yield
            finally:
                self._clear_memories()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                states: Sequence[AdapterState | None] | None = None, **kwargs):
        """Logits of the frozen model, row i adapted by states[i]. Left padding is handled."""
        if attention_mask is not None and "position_ids" not in kwargs:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        self._check_batch(input_ids, states)
        with self.adapters(states):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 states: Sequence[AdapterState | None] | None = None, **generate_kwargs) -> torch.Tensor:
        """`transformers` generate (KV cache, streamers, ...) with row i adapted by states[i]."""
        self._check_batch(input_ids, states)
        with self.adapters(states, fold=True):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            **generate_kwargs)

    @staticmethod
    def _check_batch(input_ids: torch.Tensor, states) -> None:
        if states is not None and len(states) != input_ids.shape[0]:
            raise ValueError(f"{len(states)} states for a batch of {input_ids.shape[0]} rows")

    # --- absorbing -------------------------------------------------------------------------------

    def windows_of(self, chunks: Chunks) -> list[list[int]]:
        """Token windows of at most config.window tokens; each chunk is split on its own."""
        if isinstance(chunks, str):
            chunks = [chunks]
        token_chunks = []
        for chunk in chunks:
            if isinstance(chunk, str):
                if self.tokenizer is None:
                    raise ValueError("text given but the model has no tokenizer; pass token ids")
                chunk = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
            token_chunks.append([int(t) for t in chunk])
        w = self.config.window
        return [c[i:i + w] for c in token_chunks for i in range(0, len(c), w)]

    @torch.no_grad()
    def absorb(self, state: AdapterState, chunks: Chunks, windows_per_pass: int = 16) -> AdapterState:
        """A new state that also holds `chunks`; the old state is left as it is."""
        return self.absorb_many([state], [chunks], windows_per_pass)[0]

    @torch.no_grad()
    def absorb_many(self, states: Sequence[AdapterState], chunks_per_user: Sequence[Chunks],
                    windows_per_pass: int = 16) -> list[AdapterState]:
        """absorb() for several users in shared passes (each user's windows stay in order)."""
        if len(states) != len(chunks_per_user):
            raise ValueError(f"{len(states)} states but {len(chunks_per_user)} chunk lists")
        for state in states:
            self._check_state(state)
        windows = [self.windows_of(c) for c in chunks_per_user]
        sums = [dict(s.sums) for s in states]
        longest = max((len(w) for w in windows), default=0)
        for start in range(0, longest, windows_per_pass):
            group = [w[start:start + windows_per_pass] for w in windows]
            active = [u for u, g in enumerate(group) if g]
            packed = pack_windows([[Window(ids) for ids in group[u]] for u in active]).to(self.device)
            prior = {name: torch.stack([sums[u][name] for u in active]) for name in self.adapted}
            with self.memory_pass(prior, packed.rows, packed.sum_mask) as p:
                self.base_model.get_decoder()(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                              use_cache=False)
            for j, u in enumerate(active):
                sums[u] = {name: total[j].cpu() for name, total in p.totals.items()}
        return [
            AdapterState(sums=new_sums, generator_id=s.generator_id, base_model_id=s.base_model_id,
                         tokens=s.tokens + sum(map(len, w)), chunks=s.chunks + len(w), extra=dict(s.extra))
            for s, new_sums, w in zip(states, sums, windows)
        ]

    @contextlib.contextmanager
    def memory_pass(self, prior: dict[str, torch.Tensor], rows: int,
                    sum_mask: torch.Tensor) -> Iterator[_MemoryPass]:
        """Within the block, one forward over `rows` = U*W rows absorbs W windows for each of U users.

        prior: module name -> (U, r, r) sums before the first window. Window j of user u (row
        u*W + j) is adapted by prior[u] + the sums of its windows < j. sum_mask (U*W, T) marks the
        tokens written into memory. After the block, the returned object's `totals` holds prior +
        all windows. Works with gradients (training) as well as without (absorb).
        """
        users = next(iter(prior.values())).shape[0]
        if rows % users or sum_mask.shape[0] != rows:
            raise ValueError(f"{rows} rows (sum_mask {tuple(sum_mask.shape)}) cannot be split among {users} users")
        p = _MemoryPass(prior={n: s.to(self.device, torch.float32) for n, s in prior.items()},
                        token_mask=sum_mask.to(self.device), users=users, windows=rows // users)
        with self._lock:
            self._pass = p
            try:
                yield p
            finally:
                self._pass = None
                self._clear_memories()

    def _hook_for(self, layer_index: int):
        def hook(_module, args, kwargs):
            if self._pass is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._write_layer_memories(layer_index, hidden)
        return hook

    def _write_layer_memories(self, layer_index: int, hidden: torch.Tensor) -> None:
        p = self._pass
        r = self.config.rank
        for name, layer in self._by_layer[layer_index]:
            sums = layer.context_sums(hidden, p.token_mask).view(p.users, p.windows, r, r)  # (U, W, r, r)
            inclusive = p.prior[name].unsqueeze(1) + sums.cumsum(1)  # (U, W, r, r)
            before = torch.cat([p.prior[name].unsqueeze(1), inclusive[:, :-1]], dim=1)  # (U, W, r, r)
            memory = normalize(before, self.config.normalization, self.config.polar_steps)
            layer.memory = memory.reshape(p.users * p.windows, r, r)
            p.totals[name] = inclusive[:, -1]  # (U, r, r)

    def _clear_memories(self) -> None:
        for layer in self.adapted.values():
            layer.memory = None
            layer.fold(None)
