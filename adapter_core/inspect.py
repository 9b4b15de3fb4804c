"""What an adapter looks like inside: norms and spectra per adapted module, for people to inspect."""

from __future__ import annotations

import torch

from .memory.export import lora_factors
from .memory.model import GenerativeAdapterModel
from .memory.state import AdapterState


@torch.no_grad()
def adapter_summary(engine: GenerativeAdapterModel, state: AdapterState) -> list[dict]:
    """One row per adapted module, in model order:

    layer, module, sum_norm (||S||_F, grows with history; for a fine-tuned pair, of (B^T B)(A A^T)),
    delta_norm (||Delta W||_F of the LoRA it applies), singular_values (of S, largest first, divided
    by the largest: how many directions the memory uses).
    """
    rows = []
    for name, (lora_a, lora_b) in lora_factors(engine, state).items():
        btb, aat = lora_b.T @ lora_b, lora_a @ lora_a.T  # (r, r) each
        # a fine-tuned state has no sums: its pair's own product B A stands for S (its rank, its spectrum)
        s = state.sums[name].float() if name in state.sums else btb @ aat
        # ||B A||_F without forming the d_out x d_in matrix: trace((B^T B)(A A^T))
        delta = torch.sqrt(torch.clamp((btb * aat).sum(), min=0))
        sigma = torch.linalg.svdvals(s)
        top = sigma[0].item()
        rows.append({
            "layer": engine.layer_index[name],
            "module": name.rsplit(".", 1)[-1],
            "sum_norm": torch.linalg.matrix_norm(s).item(),
            "delta_norm": delta.item(),
            "singular_values": (sigma / top).tolist() if top > 0 else [0.0] * len(sigma),
        })
    return rows
