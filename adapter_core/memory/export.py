"""Export a user's adapter as a standard PEFT LoRA folder.

Per adapted module the generated adapter is an exact rank-r LoRA: with nn.Linear weights
W_A1 (r x d_in) and W_B (d_out x r), y = W0 x + s * W_B M^T W_A1 x, so
lora_A = M^T W_A1 and lora_B = s W_B, with lora_alpha = r so that PEFT's scaling is 1.
The rank is zero-padded to a size multi-LoRA servers (vLLM) accept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import GenerativeAdapterModel, decoder_layers
from .state import AdapterState

SERVABLE_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def servable_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank` (or `rank` itself beyond the list)."""
    return next((r for r in SERVABLE_RANKS if r >= rank), rank)


def lora_factors(engine: GenerativeAdapterModel, state: AdapterState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted module, the exact LoRA (lora_A (r, d_in), lora_B (d_out, r)) that `state` applies, fp32:
    a generator's memory read through its lora_A and lora_B, or a fine-tuned state's own pair."""
    adapter = engine.user_adapter(state)
    if adapter.pairs is not None:
        return {name: (a.float().cpu(), b.float().cpu()) for name, (a, b) in adapter.pairs.items()}
    return {name: tuple(t.cpu() for t in layer.lora_pair(adapter.memory[name])) for name, layer in engine.adapted.items()}


def _largest_rank(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    return max(lora_a.shape[0] for lora_a, _ in factors.values())


def lora_weights(engine: GenerativeAdapterModel, state: AdapterState,
                 rank: int | None = None) -> dict[str, torch.Tensor]:
    """PEFT-named fp32 tensors of the adapter for `state`, rank padded to `rank` (default: its own)."""
    return _peft_tensors(lora_factors(engine, state), rank)


def _peft_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int | None) -> dict[str, torch.Tensor]:
    largest = _largest_rank(factors)
    rank = rank or largest
    if rank < largest:
        raise ValueError(f"cannot export rank {largest} into rank {rank}")
    tensors = {}
    for name, (lora_a, lora_b) in factors.items():
        pad = rank - lora_a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.nn.functional.pad(lora_a, (0, 0, 0, pad))
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.nn.functional.pad(lora_b, (0, pad))
    return {k: v.contiguous() for k, v in tensors.items()}


def export_peft(engine: GenerativeAdapterModel, state: AdapterState, folder: str | Path,
                pad_to_servable_rank: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into `folder` and return it."""
    cfg = engine.config
    factors = lora_factors(engine, state)
    rank = servable_rank(_largest_rank(factors)) if pad_to_servable_rank else _largest_rank(factors)
    tensors = {k: v.to(dtype) for k, v in _peft_tensors(factors, rank).items()}
    num_layers = len(decoder_layers(engine.base_model))
    layers = cfg.layer_indices(num_layers)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": engine.base_model_id,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in cfg.target_modules}),
        "layers_to_transform": None if len(layers) == num_layers else list(layers),
        "layers_pattern": None if len(layers) == num_layers else "layers",
        "inference_mode": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    metadata = {"format": "pt", "generator_id": state.generator_id, "tokens_absorbed": str(state.tokens)}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=metadata)
    return folder
