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
maximum recovers the file's own grid; the kernel keeps d and m in bf16 (~0.2% of a step) and
takes bf16 activations, so decoded tokens see bf16-level rounding in these layers.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

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


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Asymmetric 4-bit quantization by groups of `group_size` inputs, or None when the weight
    does not already lie on such a grid (it would lose precision).

    weight: (d_out, d_in). Returns (packed weight (d_out, d_in / 2) uint8, scales and zeros
    (d_in / group_size, d_out, 2) bf16), the layout of torch's CPU int4 kernel, which computes
    w = (q - 8) * scale + zero; with zero = m + 8 d that is Q4_1's q * d + m.
    """
    d_out, d_in = weight.shape
    groups = weight.detach().float().reshape(d_out, d_in // group_size, group_size)  # (N, G, 32)
    low = groups.amin(-1, keepdim=True)  # m
    step = ((groups.amax(-1, keepdim=True) - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)  # d
    q = ((groups - low) / step).round().clamp(0, 15)  # (N, G, 32)
    if ((q * step + low - groups).abs() > GRID_TOLERANCE * step).any():
        return None
    scales_and_zeros = torch.cat([step, low + 8 * step], dim=-1)  # (N, G, 2)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(d_out, d_in), 1)
    return packed, scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


def can_quantize(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
    return linear.in_features % group_size == 0 and linear.out_features % _OUTPUT_MULTIPLE == 0


class Int4Linear(nn.Linear):
    """A frozen nn.Linear that also holds its weight in 4 bits, used for small inputs.

    The fp32 `weight` (and `bias`) are the original Parameters, shared, not copied, so tied
    embeddings stay tied and the state dict is unchanged; the 4-bit copy is a non-persistent buffer.
    """

    def __init__(self, base: nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor], max_rows: int = MAX_ROWS):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.max_rows = max_rows
        packed, scales_and_zeros = quantized  # from quantize_int4(base.weight)
        self.group_size = base.in_features // scales_and_zeros.shape[0]
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)  # (rows, d_in)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., d_out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, 4-bit groups of {self.group_size} for <= {self.max_rows} rows"


def kernel_available() -> bool:
    """Whether this torch build has the CPU int4 kernel and it runs here."""
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
                setattr(parent, name, Int4Linear(child, quantized, max_rows))
                replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced


def four_bit_layers(model: nn.Module) -> int:
    """How many layers of the model decode on 4-bit weights."""
    return sum(isinstance(m, Int4Linear) for m in model.modules())


Q8_TOLERANCE = 1e-3
"""How far (in steps) a weight may lie from its Q8_0 group's grid and still count as 8-bit."""


def quantize_q8_as_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An 8-bit weight (GGUF Q8_0: per group of 32 inputs w = q * d, q in -128..127) as a 4-bit
    one of twice the inputs, or None when the weight is not on such a grid.

    q = 16 hi + lo with hi in -8..7 and lo in 0..15, so  W x = (16 d hi) x + (d lo) x:  one 4-bit
    product of [x, x] with the hi halves of the groups first and the lo halves after (see
    `int4_matmul`'s callers: the input is concatenated with itself). Nothing is rounded but the
    scales, to bf16 as in every 4-bit layer; a decode step then reads 2 x 4 bits per weight instead
    of 32 (the tied embedding of the default model is Q8_0 and is its largest matrix).

    weight: (d_out, d_in). Returns (packed (d_out, d_in) uint8, scales and zeros (2 d_in / group_size, d_out, 2) bf16).
    """
    d_out, d_in = weight.shape
    nibbles = torch.empty(d_out, 2 * d_in, dtype=torch.int32)  # (N, 2 d_in): the hi halves, then the lo halves
    scales_and_zeros = torch.empty(2 * d_in // group_size, d_out, 2)  # (2G, N, 2)
    for start in range(0, d_out, _ROWS_AT_ONCE):  # by rows: an embedding's fp32 temporaries are large
        rows = slice(start, min(start + _ROWS_AT_ONCE, d_out))
        groups = weight[rows].detach().float().reshape(-1, d_in // group_size, group_size)  # (n, G, 32)
        step = (groups.abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # d
        q = (groups / step).round().clamp(-128, 127)  # (n, G, 32)
        if ((q * step - groups).abs() > Q8_TOLERANCE * step).any():
            return None
        hi = torch.div(q, 16, rounding_mode="floor")  # -8..7
        nibbles[rows, :d_in] = (hi + 8).reshape(-1, d_in).to(torch.int32)
        nibbles[rows, d_in:] = (q - 16 * hi).reshape(-1, d_in).to(torch.int32)  # lo: 0..15
        # the kernel computes (n - 8) * scale + zero: hi: scale 16 d, zero 0; lo: scale d, zero 8 d
        step = step[..., 0].T  # (G, n)
        groups_in = d_in // group_size
        scales_and_zeros[:groups_in, rows] = torch.stack([16 * step, torch.zeros_like(step)], dim=-1)
        scales_and_zeros[groups_in:, rows] = torch.stack([step, 8 * step], dim=-1)
    packed = torch._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    return packed, scales_and_zeros.to(torch.bfloat16)


_ROWS_AT_ONCE = 4096
