"""A lean decode step for Llama-family models (Llama, Mistral, Qwen2) on the CPU.

Decoding one token per row costs little arithmetic; on a small CPU it is bound by reading the
weights once per step and by the cost of each operation's dispatch (a 30-layer model runs
~1,500 small operations per token through transformers). This step computes the same thing as
the transformers model with fewer, larger operations:

    token ─► embedding ─► 30 x ┌ norm ─► [q|k|v] (one product) ─► rotary ─► write K, V in place ─► attention ─► o ┐
                               └ norm ─► [gate|up] (one product) ─► act(gate) * up ─► down ◄──────────────────────┘
           ─► norm ─► lm_head (the tied Q8_0 embedding as two 4-bit halves, adapter_core.serving.int4)

* products of layers sharing an input are fused into one (4-bit where the layers are, else fp32);
* keys and values are written into the batch's KVCache in place (no concatenation per step);
* each adapted module's adapter is added to its slice of the fused output: one user's folded
  LoRA pair as two products, several users' memories through `AdapterLinear.delta` (the
  transformers path's own code; the C++ layers compute the same product in their own loops),
  so the adapted model is the same on every path (tested);
* the output layer reads 8 bits per weight instead of 32 when the weight lies on a Q8_0 grid.

Norms are `F.rms_norm` with the model's weights and epsilon; rotary embeddings and activations are
the model's own modules. Where this step does not apply (another architecture, a GPU, other
dtypes, a sliding window shorter than the batch), the decode batch uses the transformers model as
before (see `DecodeBatch.step`). In the commonest case (the default model and targets) the decoder
layers run in C++ (`NativeLayers`, lean_step.cpp): the 4-bit products, and our own loops
between them instead of ~50 small ATen operations per layer. Measurements and what was tried:
docs/decode-speed.md.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import rotate_half

from . import int4, native
from .kv_cache import KVCache
from ..memory.layer import AdapterLinear
from ..memory.model import GenerativeAdapterModel, RowAdapters, decoder_layers

log = logging.getLogger(__name__)

SUPPORTED_MODELS = ("llama", "mistral", "qwen2")
"""model_type values whose decoder layer this step reproduces (the same layer in transformers)."""


@dataclass(frozen=True)
class Fused:
    """Linear layers that share an input, computed as one product: (B, d_in) -> (B, sum of d_out)."""

    weight: torch.Tensor | None  # (d_out, d_in) fp32, or None when 4-bit
    packed: torch.Tensor | None  # the 4-bit kernel's layout (adapter_core.serving.int4)
    scales_and_zeros: torch.Tensor | None
    bias: torch.Tensor | None  # (d_out,)
    group_size: int
    input_copies: int = 1  # 2 for a Q8_0 weight held as two 4-bit halves: the input is [x, x]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x).to(x.dtype)  # (B, d_out)
        return y if self.bias is None else y + self.bias

    def add_to(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h += the product of x, in place (a 4-bit product's bf16 output is added as it is: one
        operation fewer than converting it first)."""
        h.add_(self._product(x))
        return h if self.bias is None else h.add_(self.bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, d_in) times the weight, no bias: bf16 when 4-bit, else fp32."""
        if self.packed is None:
            return F.linear(x, self.weight)
        if self.input_copies > 1:
            x = x.repeat(1, self.input_copies)  # (B, copies * d_in)
        return int4.matmul(x, self.packed, self.scales_and_zeros, self.group_size)


def fuse(linears: list[nn.Module]) -> Fused:
    """One product for layers sharing an input: 4-bit when every one of them decodes in 4 bits.
    A single layer's own tensors are used as they are, not copied."""
    bases = [getattr(m, "base_layer", m) for m in linears]
    if len(bases) == 1:
        base = bases[0]
        if isinstance(base, int4.Int4Linear):
            return Fused(None, base.packed, base.scales_and_zeros, base.bias, base.group_size)
        return Fused(base.weight, None, None, base.bias, 0)
    weight = torch.cat([b.weight.detach() for b in bases])  # (sum d_out, d_in)
    biases = [b.bias for b in bases]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, bases)])
    if all(isinstance(b, int4.Int4Linear) for b in bases):
        group_size = bases[0].group_size
        # on the grid already: each part is; laid out for the parts' kernel
        quantized = int4.quantize_int4(weight, group_size, own=int4.for_own_kernel(bases[0].packed))
        if quantized is not None:
            return Fused(None, *quantized, bias, group_size)
    return Fused(weight, None, None, bias, 0)


def output_layer(lm_head: nn.Linear, own: bool) -> Fused | nn.Module:
    """The output layer as two 4-bit halves when its weight is on a Q8_0 grid (laid out for our
    kernel or torch's, as `own` says), else itself."""
    if (lm_head.weight.dtype == torch.float32 and int4.can_quantize(lm_head)
            and int4.kernel_available()):
        halves = int4.quantize_q8_as_int4(lm_head.weight, own=own)
        if halves is not None:
            return Fused(None, *halves, lm_head.bias, int4.GROUP_SIZE, input_copies=2)
    return lm_head


@dataclass(frozen=True)
class Norm:
    """A decoder's RMSNorm (weight, eps) as one fused operation (F.rms_norm, the same arithmetic)."""

    weight: torch.Tensor
    eps: float

    @classmethod
    def of(cls, module: nn.Module) -> Norm:
        return cls(module.weight, getattr(module, "variance_epsilon", None) or module.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


@dataclass(frozen=True)
class LeanLayer:
    input_norm: Norm
    qkv: Fused
    o: Fused
    post_norm: Norm
    gate_up: Fused
    down: Fused
    act: nn.Module
    adapted: dict[str, list[tuple[str, AdapterLinear, int, int]]]
    """fused product ("qkv", "o", "gate_up", "down") -> its adapted modules: (name, layer, start, end of its slice)."""


_PROJECTIONS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
                "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}


class LeanDecoder:
    """The decode step of one engine's base model (see the module's docstring)."""

    def __init__(self, engine: GenerativeAdapterModel):
        model = engine.base_model
        config = model.config
        self.decoder = model.get_decoder()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        self.sliding_window = window if window and getattr(config, "use_sliding_window", True) else None
        names = {id(m): name for name, m in engine.adapted.items()}
        self.layers = []
        for layer in decoder_layers(model):
            fused, adapted = {}, {}
            for product, (parent, children) in _PROJECTIONS.items():
                modules = [getattr(getattr(layer, parent), child) for child in children]
                fused[product] = fuse(modules)
                start = 0
                for module in modules:
                    if isinstance(module, AdapterLinear):
                        adapted.setdefault(product, []).append(
                            (names[id(module)], module, start, start + module.base_layer.out_features))
                    start += getattr(module, "base_layer", module).out_features
            self.layers.append(LeanLayer(Norm.of(layer.input_layernorm), fused["qkv"], fused["o"],
                                         Norm.of(layer.post_attention_layernorm),
                                         fused["gate_up"], fused["down"], layer.mlp.act_fn, adapted))
        self.norm = Norm.of(self.decoder.norm)
        lm_head = model.get_output_embeddings()
        # 8 bits for the output layer only where the model decodes in 4 bits at all (--no-int4-decode: fp32)
        self.lm_head = output_layer(lm_head, int4.own_layout(model)) if int4.four_bit_layers(model) else lm_head
        self.native = NativeLayers.for_layers(self.layers)
        self._last: tuple[RowAdapters | None, _Prepared] | None = None

    def applies(self, width: int) -> bool:
        """Whether a step over `width` cache columns (the one being written included) computes the
        model exactly: beyond a sliding window the model would forget what this step still sees."""
        return self.sliding_window is None or width <= self.sliding_window

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask: torch.Tensor,
             adapters: RowAdapters | None) -> torch.Tensor:
        """Logits (B, V) of each row's next token; writes the tokens' keys and values into the cache
        at column cache.width (room reserved) and advances it.

        tokens, positions: (B,); mask: (B, width + 1), 1 for real tokens, the new column included.
        """
        b = tokens.shape[0]
        h = self.decoder.embed_tokens(tokens)  # (B, D)
        cos, sin = self.decoder.rotary_emb(h, positions[:, None])  # (B, 1, head_dim) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, head_dim): the same for every head
        # padding columns get -inf; an additive float mask, made once, spares each layer the conversion
        attend = None if bool(mask.all()) else torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(
            mask == 0, float("-inf"))[:, None, None, :]  # (B, 1, 1, width + 1); None: no padding to hide
        cache.reserve(1)
        prepared = self._prepared(adapters)
        if self.native is not None and prepared.native is not None:
            h = self.native(h, cos, sin, attend, cache, self.heads, self.kv_heads, self.head_dim, prepared.native)
            cache.width += 1
            return self.lm_head(self.norm(h))  # (B, V)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, (layer, adapted) in enumerate(zip(self.layers, prepared.by_layer)):
            x = layer.input_norm(h)  # (B, D)
            qkv = _adapt(layer.qkv(x), x, adapted.get("qkv"))  # (B, q_size + 2 kv_size)
            qk = qkv[:, :q_size + kv_size].view(b, self.heads + self.kv_heads, 1, self.head_dim)
            qk = qk * cos + rotate_half(qk) * sin  # transformers' apply_rotary_pos_emb, q and k at once
            q, k = qk[:, :self.heads], qk[:, self.heads:]  # (B, H, 1, hd), (B, H_kv, 1, hd)
            cache.write(i, k[:, :, 0], qkv[:, q_size + kv_size:].view(b, self.kv_heads, self.head_dim))
            keys, values = cache.keys[i][:, :, :cache.width + 1], cache.values[i][:, :, :cache.width + 1]
            attention = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend,
                                                       enable_gqa=self.heads != self.kv_heads)  # (B, H, 1, hd)
            attention = attention.reshape(b, q_size)
            _adapt(layer.o.add_to(h, attention), attention, adapted.get("o"))  # the residual, in place
            x = layer.post_norm(h)
            gate, up = _adapt(layer.gate_up(x), x, adapted.get("gate_up")).chunk(2, dim=-1)  # (B, I) each
            z = layer.act(gate) * up
            _adapt(layer.down.add_to(h, z), z, adapted.get("down"))
        cache.width += 1
        return self.lm_head(self.norm(h))  # (B, V)

    def _prepared(self, adapters: RowAdapters | None) -> _Prepared:
        """The batch's adapters laid out for the step, made once per RowAdapters (a batch keeps its
        own until rows join or leave), not at every token."""
        last = self._last
        if last is None or last[0] is not adapters:
            last = self._last = (adapters, _Prepared.of(self.layers, adapters, self.native))
        return last[1]


@dataclass(frozen=True)
class _Adapter:
    """What one adapted module adds to its slice [start, end) of a fused product's output."""

    start: int
    end: int
    lora_a_t: torch.Tensor | None = None  # (d_in, r): one user's folded pair, transposed
    lora_b_t: torch.Tensor | None = None  # (r, d_out)
    module: AdapterLinear | None = None  # else each row's memory or pair, through the module's own delta
    memory: torch.Tensor | None = None  # (B, r, r)
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, R, d_in), (B, d_out, R)


@dataclass(frozen=True)
class _Prepared:
    by_layer: list[dict[str, list[_Adapter]]]
    """For each layer, its fused products' adapters (the Python step)."""
    native: list[torch.Tensor] | None
    """o's and down's adapters laid out for the C++ layers (NativeLayers.adapter), layer by layer
    (empty: no adapter; None: the C++ layers cannot take these adapters, the Python step runs)."""

    @classmethod
    def of(cls, layers: list[LeanLayer], adapters: RowAdapters | None, native: NativeLayers | None) -> _Prepared:
        if adapters is None:
            return cls([{} for _ in layers], [])
        by_layer = []
        for layer in layers:
            here = {}
            for product, modules in layer.adapted.items():
                for name, module, start, end in modules:
                    if adapters.folded is not None:
                        lora_a, lora_b = adapters.folded[name]
                        adapter = _Adapter(start, end, lora_a.T, lora_b.T)
                    elif adapters.pairs is not None:
                        adapter = _Adapter(start, end, module=module, pairs=adapters.pairs[name])
                    else:
                        adapter = _Adapter(start, end, module=module, memory=adapters.memory[name])
                    here.setdefault(product, []).append(adapter)
            by_layer.append(here)
        if native is None or (adapters.pairs is not None and not NativeLayers.takes_pairs(adapters.pairs)):
            return cls(by_layer, None)
        return cls(by_layer, [t for here in by_layer for product in ("o", "down")
                              for t in native.adapter(here[product][0])])


def _adapt(y: torch.Tensor, x: torch.Tensor, adapters: list[_Adapter] | None) -> torch.Tensor:
    """y (B, d_out) of a fused product of x (B, d_in), plus each adapter's delta in its slice, in place."""
    for adapter in adapters or ():
        out = y[:, adapter.start:adapter.end]
        if adapter.module is None:  # the folded LoRA pair (AdapterLinear.delta's first case), in two products
            out.addmm_(torch.mm(x, adapter.lora_a_t), adapter.lora_b_t)
        else:
            out += adapter.module.delta(x, None, adapter.memory, adapter.pairs)
    return y


class NativeLayers:
    """The decoder layers of the step in C++ (lean_step.cpp, built by adapter_core.serving.native):
    the 4-bit products (the kernel int4.py chose), and loops of our own for everything between
    them, for the commonest case: every product 4-bit without bias, SiLU, and adapters (one user's
    folded pairs or each row's memory) on o_proj and down_proj of every layer (the default
    targets), or none."""

    def __init__(self, layers: list[LeanLayer], module) -> None:
        self.module = module
        self.norms = [w for layer in layers for w in (layer.input_norm.weight, layer.post_norm.weight)]
        self.eps = layers[0].input_norm.eps
        self.products = [t for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
                         for t in (p.packed, p.scales_and_zeros)]
        self.group_size = layers[0].qkv.group_size

    @classmethod
    def for_layers(cls, layers: list[LeanLayer]) -> NativeLayers | None:
        """None where the case is not the common one, or no C++ compiler builds it (then the Python step runs)."""
        products = [p for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        common = (all(isinstance(layer.act, _SILU) for layer in layers)
                  and all(p.packed is not None and p.bias is None and p.input_copies == 1 for p in products)
                  and len({p.group_size for p in products}) == 1
                  and len({n for layer in layers for n in (layer.input_norm.eps, layer.post_norm.eps)}) == 1
                  # the C++ layers add an adapter (a folded pair or rows' memories) to o and to down in
                  # every layer, or none
                  and all(set(layer.adapted) == {"o", "down"} for layer in layers))
        if not common:
            return None
        module = native.compiled()
        return None if module is None else cls(layers, module)

    @staticmethod
    def takes_pairs(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Whether rows' own pairs are few and small enough to stack (see adapter): each row's
        memory is then (B*R)^2 numbers, cheap up to 128."""
        return all(a.shape[0] * a.shape[1] <= MAX_STACKED_RANK for a, _ in pairs.values())

    @staticmethod
    def adapter(adapter: _Adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """lora_A (r, d_in), lora_B^T (r, d_out) and the rows' memories (B, r, r), or an empty tensor
        for one user's folded pair; contiguous fp32. The same product as AdapterLinear.delta's.

        Rows' own pairs (B rows of rank R) go in as one stacked pair of rank B*R whose memory for
        row i keeps only its own block: lora_A = [A_1; ...; A_B], lora_B^T = [B_1^T; ...; B_B^T],
        M_i = the identity on block i, zero elsewhere. The C++ layers then need no case of their own."""
        if adapter.module is None:
            return adapter.lora_a_t.T.contiguous(), adapter.lora_b_t.contiguous(), _NO_MEMORY
        if adapter.pairs is not None:
            lora_a, lora_b = adapter.pairs  # (B, R, d_in), (B, d_out, R)
            rows, rank = lora_a.shape[:2]
            return (lora_a.reshape(rows * rank, -1).float().contiguous(),
                    lora_b.transpose(1, 2).reshape(rows * rank, -1).float().contiguous(), _block_selectors(rows, rank))
        module = adapter.module
        lora_b_t = (module.scaling * module.lora_B.weight.detach()).T.contiguous()
        return module.lora_A.weight.detach().float().contiguous(), lora_b_t.float(), adapter.memory.float().contiguous()

    def __call__(self, h, cos, sin, attend, cache: KVCache, heads: int, kv_heads: int, head_dim: int,
                 adapters: list[torch.Tensor]) -> torch.Tensor:
        """adapters: o's and down's, as `adapter` lays them out, layer by layer (empty: no adapter)."""
        return self.module.decoder_layers(h, cos, sin, attend, self.norms, self.eps, self.products, self.group_size,
                                          cache.keys, cache.values, cache.width, heads, kv_heads, head_dim, adapters)


@functools.lru_cache(maxsize=16)
def _block_selectors(rows: int, rank: int) -> torch.Tensor:
    """(rows, rows*rank, rows*rank): row i's memory is the identity on block i, zero elsewhere (see
    NativeLayers.adapter). The same for every module of that rank, so made once per shape (read only)."""
    selectors = torch.zeros(rows, rows * rank, rows * rank)
    for i in range(rows):
        selectors[i, i * rank:(i + 1) * rank, i * rank:(i + 1) * rank] = torch.eye(rank)
    return selectors


_SILU = (nn.SiLU, SiLUActivation)
MAX_STACKED_RANK = 128
"""Largest rows x rank of rows' own pairs that the C++ layers take stacked (NativeLayers.takes_pairs)."""
_NO_MEMORY = torch.empty(0)


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lean_decoder(engine: GenerativeAdapterModel) -> LeanDecoder | None:
    """The engine's lean decoder (built once, on first use), or None where it does not apply."""
    if engine not in _decoders:
        config = engine.base_model.config
        ok = (config.model_type in SUPPORTED_MODELS and engine.device.type == "cpu"
              and all(p.dtype == torch.float32 for p in engine.base_model.parameters()))
        started = time.perf_counter()
        _decoders[engine] = decoder = LeanDecoder(engine) if ok else None
        if decoder is not None:
            four_bit = sum(layer.qkv.packed is not None for layer in decoder.layers)
            log.info("lean decode step ready in %.1f s: %d of %d layers on fused 4-bit products, output layer %s",
                     time.perf_counter() - started, four_bit, len(decoder.layers),
                     "8-bit (two 4-bit halves)" if isinstance(decoder.lm_head, Fused) and decoder.lm_head.input_copies == 2
                     else "as it is")
    return _decoders[engine]
