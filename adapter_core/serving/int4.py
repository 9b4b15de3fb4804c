"""4-bit weights for decoding on the CPU, for models whose weights are 4-bit already.

Decoding one token multiplies a single row by every weight of the model once, so on a CPU it
runs at the speed of memory: fp32 weights are read at ~18 GB/s on our 2-core machine, and 4-bit
ones hold 7x fewer bytes. Prefill and absorption multiply many rows at a time, are bound by
arithmetic instead, and are faster on the fp32 weights, which therefore stay: `Int4Linear`
picks the 4-bit kernel only for inputs of at most `max_rows` rows and never where gradients
are needed (the kernel has none).

Only layers whose weights already lie on a 4-bit grid are converted, so nothing is rounded
that was not rounded before: the embedded default model is a GGUF whose linear layers are Q4_1
(per group of 32 inputs, w = q * d + m with q in 0..15); its tied embedding is Q8_0 and stays
fp32. The minimum of a Q4_1 group is m and the maximum m + 15 d, so quantizing by minimum and
maximum recovers the file's own grid.

Two kernels compute the product, chosen once per process (`own_kernel`) and told apart by the
weights' layout, so every path of one process uses the same one:
* torch's (`torch._weight_int4pack_mm_for_cpu`): d and m in bf16 (~0.2% of a step), bf16
  activations. With AVX-512 it decodes as fast as llama.cpp; with AVX2 only it converts every
  weight to fp32 and runs at half llama.cpp's speed (docs/decode-speed.md).
* ours (`q4_product` in lean_step.cpp), used with AVX2 and without AVX-512: d and m in fp16 (as
  the GGUF file has them: Q4_1's and Q8_0's scales are fp16), and each group of 32 activations
  rounded to int8 with its own scale, as llama.cpp does (its Q8_1), so the products are integer
  sums. Layout: nibbles (d_out, d_in / 32, 16) uint8, byte j holding q_j and q_(j+16); dm
  (d_out, d_in / 32, 2) fp16.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import native

log = logging.getLogger(__name__)

GROUP_SIZE = 32
"""Inputs sharing one scale and offset (GGUF Q4_1 blocks hold 32)."""
MAX_ROWS = 32
"""Largest input (batch x tokens) sent to the 4-bit kernel; measured crossover with fp32 on the
2-core CPU: 4x faster at 1 row, 2x at 16, 1.2x at 32, slower from 64."""
GRID_TOLERANCE = 1e-3
"""How far (in steps) a weight may lie from its group's grid and still count as 4-bit: fp32
arithmetic puts dequantized weights within ~1e-6 steps; in weights that never were 4-bit, some
lie up to half a step away."""
_OUTPUT_MULTIPLE = 16  # the kernel packs output features in blocks of 16


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE, own: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Asymmetric 4-bit quantization by groups of `group_size` inputs, or None when the weight
    does not already lie on such a grid (it would lose precision).

    weight: (d_out, d_in). Returns (packed weight, scales) laid out for our kernel (own) or torch's
    (None: the one `own_kernel` chose), which `matmul` will then use (see the module's docstring).
    """
    d_out, d_in = weight.shape
    groups = weight.detach().float().reshape(d_out, d_in // group_size, group_size)  # (N, G, 32)
    low = groups.amin(-1, keepdim=True)  # m
    step = ((groups.amax(-1, keepdim=True) - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)  # d
    q = ((groups - low) / step).round().clamp(0, 15)  # (N, G, 32)
    if ((q * step + low - groups).abs() > GRID_TOLERANCE * step).any():
        return None
    return _laid_out(q.to(torch.uint8), step[..., 0], low[..., 0], own)


def _laid_out(q: torch.Tensor, step: torch.Tensor, low: torch.Tensor, own: bool | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights w = q * step + low by groups, q (N, G, group) uint8 in 0..15, step and low (N, G), in
    the chosen kernel's layout: ours (blocks of 32) or torch's, which computes w = (q - 8) * scale + zero,
    so zero = low + 8 step (packed (N, G * group / 2) uint8, scales and zeros (G, N, 2) bf16)."""
    d_out, groups, group_size = q.shape
    if group_size == GROUP_SIZE and (own_kernel() if own is None else own):
        nibbles = q[..., :16] | (q[..., 16:] << 4)  # (N, G, 16): byte j holds q_j and q_(j+16)
        return nibbles.contiguous(), torch.stack([step, low], dim=-1).half().contiguous()  # (N, G, 2)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(d_out, groups * group_size), 1)
    scales_and_zeros = torch.stack([step, low + 8 * step], dim=-1)  # (N, G, 2)
    return packed, scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (B, d_in) fp32 times a 4-bit weight laid out by `quantize_int4`: (B, d_out) bf16, through the
    kernel its layout is for, with its inputs as the C++ layers give them: ours (3-d nibbles) rounds
    fp32 inputs to int8 itself, torch's takes them in bf16."""
    if for_own_kernel(packed):
        return torch.ops.memchat.q4_product(x, packed, scales).to(torch.bfloat16)  # registered by native.compiled()
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size, scales)


def for_own_kernel(packed: torch.Tensor) -> bool:
    """Whether a packed 4-bit weight is laid out for our kernel (its nibbles are 3-d), not torch's."""
    return packed.dim() == 3


@functools.lru_cache(maxsize=1)
def own_kernel() -> bool:
    """Whether 4-bit weights are laid out for our kernel: where the C++ module chose it for this CPU
    (AVX2 without AVX-512), unless MEMCHAT_INT4_KERNEL says otherwise: torch (for comparing the two)
    or own (ours wherever it is built)."""
    choice = os.environ.get("MEMCHAT_INT4_KERNEL", "auto")
    if choice not in ("auto", "own", "torch"):
        raise ValueError(f"MEMCHAT_INT4_KERNEL must be auto, own or torch, not {choice!r}")
    if choice == "torch" or not own_kernel_built():
        return False
    return choice == "own" or native.compiled().q4_kernel()


def activations() -> str:
    """How the chosen kernel takes its inputs, for logs and reports."""
    return "int8 activations by groups of 32 (our product)" if own_kernel() else "bf16 activations (torch's product)"


def own_kernel_built() -> bool:
    """Whether our kernel was built on this machine (the C++ module, with AVX2)."""
    module = native.compiled()
    return module is not None and module.q4_built()


def can_quantize(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
    return linear.in_features % group_size == 0 and linear.out_features % _OUTPUT_MULTIPLE == 0


class Int4Linear(nn.Linear):
    """A frozen nn.Linear that also holds its weight in 4 bits, used for small inputs.

    The fp32 `weight` (and `bias`) are the original Parameters, shared, not copied, so tied
    embeddings stay tied and the state dict is unchanged; the 4-bit copy is a non-persistent buffer.
    """

    def __init__(self, base: nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor], max_rows: int = MAX_ROWS,
                 group_size: int = GROUP_SIZE):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.max_rows = max_rows
        packed, scales_and_zeros = quantized  # from quantize_int4(base.weight, group_size)
        self.group_size = group_size
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        y = matmul(x.reshape(rows, self.in_features), self.packed, self.scales_and_zeros, self.group_size)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., d_out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, 4-bit groups of {self.group_size} for <= {self.max_rows} rows"


def kernel_available() -> bool:
    """Whether a 4-bit kernel runs here: ours (where `own_kernel`), else torch's, if this torch build has it."""
    try:
        base = nn.Linear(GROUP_SIZE, _OUTPUT_MULTIPLE, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.arange(GROUP_SIZE).remainder(16).float().expand_as(base.weight))
            Int4Linear(base, quantize_int4(base.weight))(torch.ones(1, GROUP_SIZE))
        return True
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        log.warning("4-bit decoding is not available in this torch build (%s); decoding stays fp32", e)
        return False


def quantize_for_decoding(model: nn.Module, group_size: int = GROUP_SIZE, max_rows: int = MAX_ROWS
                          ) -> list[str]:
    """Replace, in place, every nn.Linear of an fp32 CPU model whose weight lies on a 4-bit grid
    (and whose shape the kernel takes) by an Int4Linear. Returns the names of the replaced layers."""
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or not can_quantize(child, group_size):
                continue
            if child.weight.device.type != "cpu" or child.weight.dtype != torch.float32:
                raise ValueError(f"4-bit decoding needs fp32 weights on the CPU, got {child.weight.dtype} "
                                 f"on {child.weight.device}")
            quantized = quantize_int4(child.weight, group_size)
            if quantized is not None:
                setattr(parent, name, Int4Linear(child, quantized, max_rows, group_size))
                replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced


def four_bit_layers(model: nn.Module) -> int:
    """How many layers of the model decode on 4-bit weights."""
    return sum(isinstance(m, Int4Linear) for m in model.modules())


def own_layout(model: nn.Module) -> bool:
    """Whether the model's 4-bit layers are laid out for our kernel (so that products made from
    them later, fused or not, use the same kernel as they do)."""
    return any(isinstance(m, Int4Linear) and for_own_kernel(m.packed) for m in model.modules())


Q8_TOLERANCE = 1e-3
"""How far (in steps) a weight may lie from its Q8_0 group's grid and still count as 8-bit."""


def quantize_q8_as_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE, own: bool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An 8-bit weight (GGUF Q8_0: per group of 32 inputs w = q * d, q in -128..127) as a 4-bit
    one of twice the inputs, or None when the weight is not on such a grid.

    q = 16 hi + lo with hi in -8..7 and lo in 0..15, so  W x = (16 d hi) x + (d lo) x:  one 4-bit
    product of [x, x] with the hi halves of the groups first and the lo halves after (callers
    concatenate the input with itself). As 4-bit groups w = n * step + low: hi: n = hi + 8,
    step 16 d, low -128 d; lo: n = lo, step d, low 0. Nothing is rounded but what the kernel's
    layout rounds (torch's: the scales, to bf16); a decode step then reads 2 x 4 bits per weight
    instead of 32 (the tied embedding of the default model is Q8_0 and is its largest matrix).

    weight: (d_out, d_in). Returns (packed weight, scales) as `quantize_int4(..., own)` lays them out, for d_in' = 2 d_in.
    """
    d_out, d_in = weight.shape
    groups_in = d_in // group_size
    n = torch.empty(d_out, 2 * groups_in, group_size, dtype=torch.uint8)  # (N, 2G, 32): the hi halves, then the lo
    step = torch.empty(d_out, 2 * groups_in)  # (N, 2G)
    low = torch.empty(d_out, 2 * groups_in)
    for start in range(0, d_out, _ROWS_AT_ONCE):  # by rows: an embedding's fp32 temporaries are large
        rows = slice(start, min(start + _ROWS_AT_ONCE, d_out))
        groups = weight[rows].detach().float().reshape(-1, groups_in, group_size)  # (n, G, 32)
        d = (groups.abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (n, G, 1)
        q = (groups / d).round().clamp(-128, 127)  # (n, G, 32)
        if ((q * d - groups).abs() > Q8_TOLERANCE * d).any():
            return None
        hi = torch.div(q, 16, rounding_mode="floor")  # -8..7
        n[rows, :groups_in] = (hi + 8).to(torch.uint8)
        n[rows, groups_in:] = (q - 16 * hi).to(torch.uint8)  # lo: 0..15
        d = d[..., 0]  # (n, G)
        step[rows] = torch.cat([16 * d, d], dim=1)
        low[rows] = torch.cat([-128 * d, torch.zeros_like(d)], dim=1)
    return _laid_out(n, step, low, own)


_ROWS_AT_ONCE = 4096
