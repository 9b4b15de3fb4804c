"""One adapted linear layer: a frozen base nn.Linear plus the generator's weights for it.

    y = W0 x + scaling * lora_B(lora_A(x) @ M)

where M (r x r) is the memory of whichever user the row of the batch belongs to. The same module
also turns context hidden states into that memory: S = sum_t ctx_key(h_t)^T ctx_value(h_t), with
h_t normalised by ctx_norm. Names follow PEFT (lora_A, lora_B, scaling) so export is a rename.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContextNorm(nn.Module):
    """RMSNorm with a learned gain, applied to context hidden states before the key/value maps."""

    def __init__(self, width: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype))
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(self.weight.dtype) * self.weight


class AdapterLinear(nn.Module):
    """Wraps a frozen `base_layer`; adds nothing until `memory` is set (B starts at zero anyway)."""

    def __init__(self, base_layer: nn.Linear, hidden_size: int, rank: int, scale: float,
                 init_std: float, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = scale
        device = base_layer.weight.device
        kw = dict(bias=False, dtype=dtype, device=device)
        self.lora_A = nn.Linear(base_layer.in_features, rank, **kw)  # A1: x -> r
        self.lora_B = nn.Linear(rank, base_layer.out_features, **kw)  # B: r -> d_out
        self.ctx_norm = ContextNorm(hidden_size, dtype=dtype).to(device)  # g
        self.ctx_key = nn.Linear(hidden_size, rank, **kw)  # A2: D -> r
        self.ctx_value = nn.Linear(hidden_size, rank, **kw)  # A3: D -> r
        with torch.no_grad():
            for linear in (self.lora_A, self.ctx_key, self.ctx_value):
                weight = torch.randn(linear.weight.shape, generator=generator) * init_std
                linear.weight.copy_(weight)
            self.lora_B.weight.zero_()  # the adapted model starts exactly as the base model
        # Per-row memory for the current call, (N, r, r) or None; set by GenerativeAdapterModel.
        self.memory: torch.Tensor | None = None
        # One user's memory folded into a plain LoRA pair (lora_A (r, d_in), lora_B (d_out, r)), or
        # None; used instead of `memory` when every row of a call belongs to the same user.
        self.folded: tuple[torch.Tensor, torch.Tensor] | None = None
        # Each row's own LoRA pair, (lora_A (N, R, d_in), lora_B (N, d_out, R)), or None; used when
        # some row's adapter is fine-tuned (adapter_core.memory.finetune) and rows belong to several users.
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def lora_pair(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact LoRA that memory M (r, r) applies: (lora_A (r, d_in), lora_B (d_out, r)).

        Reading lora_A(x) @ M as x A1^T M: delta W = scaling * B M^T A1.
        """
        a1 = self.lora_A.weight.detach().float()
        b = self.lora_B.weight.detach().float()
        return memory.to(a1.device).float().T @ a1, self.scaling * b

    @torch.no_grad()
    def folded_pair(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One user's memory (r, r) as a fixed LoRA pair in the generator's dtype, for `folded`.

        Cheaper than the per-row path (two small matmuls, no batched product), and unlike adding
        delta W into a copy of W0 it keeps W0 as it is: 4-bit on the CPU, bf16 on a GPU, where
        W0 + delta W would round most of delta W away.
        """
        dtype = self.lora_A.weight.dtype
        lora_a, lora_b = self.lora_pair(memory)
        return lora_a.to(dtype), lora_b.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (N, T, d_out)
        delta = self.delta(x, self.folded, self.memory, self.pairs)
        return y if delta is None else y + delta.to(y.dtype)

    def delta(self, x: torch.Tensor, folded: tuple[torch.Tensor, torch.Tensor] | None,
              memory: torch.Tensor | None, pairs: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor | None:
        """What the adapter adds to the base layer's output for x (N, T, d_in) or (N, d_in): the folded pair's
        product, else row i's own pair (pairs[0][i], pairs[1][i]), else row i's memory[i] (N, r, r) read
        through lora_A and lora_B, else None. (adapter_core.serving.lean_decoder calls it too, on its own fused
        layers' inputs.)"""
        if folded is not None:
            lora_a, lora_b = folded
            return F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b)  # (N, T, d_out)
        if pairs is not None:
            lora_a, lora_b = pairs  # (N, R, d_in), (N, d_out, R)
            if lora_a.shape[0] != x.shape[0]:
                raise RuntimeError(f"batch of {x.shape[0]} rows but {lora_a.shape[0]} adapters were set")
            rows = x.to(lora_a.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (N, T, d_in)
            out = torch.bmm(torch.bmm(rows, lora_a.transpose(1, 2)), lora_b.transpose(1, 2))  # (N, T, d_out)
            return out.view(*x.shape[:-1], out.shape[-1])
        if memory is None:
            return None
        if memory.shape[0] != x.shape[0]:
            raise RuntimeError(f"batch of {x.shape[0]} rows but {memory.shape[0]} adapters were set")
        a = self.lora_A(x.to(self.lora_A.weight.dtype))  # (N, T, r) (or (N, r) for x (N, d_in))
        a = torch.bmm(a.view(a.shape[0], -1, self.rank), memory.to(a.dtype)).view(a.shape)  # (N, T, r)
        return self.scaling * self.lora_B(a)  # (N, T, d_out)

    def context_sums(self, h: torch.Tensor, write_mask: torch.Tensor) -> torch.Tensor:
        """S_c = sum over the written tokens of each row of k_t v_t^T, in fp32.

        h: (N, T, D) decoder-layer inputs; write_mask: (N, T), 1 for tokens written into memory.
        Returns (N, r, r).
        """
        hn = self.ctx_norm(h.to(self.ctx_norm.weight.dtype))  # (N, T, D)
        k = self.ctx_key(hn).float()  # (N, T, r)
        k = torch.where(write_mask.unsqueeze(-1).bool(), k, 0.0)  # padding and queries write nothing
        v = self.ctx_value(hn).float()  # (N, T, r)
        return torch.einsum("ntr,nts->nrs", k, v)  # (N, r, r)

    def generator_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}
