"""Configuration of the adapter generator (the trainable part of GenerativeAdapter).

Every field is a switch a user may want to turn; each one is documented where it is declared.
Shapes are checked against a concrete base model by `GeneratorConfig.validate_for(model)`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NORMALIZATIONS = ("svd", "polar", "frobenius")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A generator config that cannot work, or cannot work with the given base model."""


@dataclass
class GeneratorConfig:
    target_modules: tuple[str, ...] = ("o_proj", "down_proj")
    """Names (relative to a decoder layer) of the linear layers that receive an adapter.
    The paper adapts the attention output projection; the MLP down projection doubles capacity."""

    layers: tuple[int, ...] | None = None
    """Indices of the decoder layers to adapt; None adapts every layer."""

    rank: int = 32
    """r: the width of the per-user memory matrix M (r x r per adapted module)."""

    scale: float = 1.0
    """s in y = W0 x + s * B(A1(x) M); multiplies the adapter's output."""

    normalization: str = "polar"
    """How the running sum S becomes M: 'svd' (exact U V^T), 'polar' (U V^T by Newton-Schulz,
    matrix products only, fast on GPUs) or 'frobenius' (S / ||S||_F, cheapest, weakest)."""

    polar_steps: int = 12
    """Newton-Schulz iterations for 'polar'; singular values above ~1e-2 of the largest reach 1."""

    window: int = 256
    """Tokens per window: history is absorbed window by window, each window encoded by the model
    already adapted by the windows before it."""

    dtype: str = "float32"
    """Dtype of the generator's weights ('float32', 'bfloat16', 'float16'). States are fp32 always."""

    init_std: float = 0.02
    """Standard deviation of the random initialisation of A1, A2 and A3 (B starts at zero)."""

    seed: int = 0
    """Seed of the random initialisation, so that an untrained generator is reproducible."""

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        problems = []
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            problems.append("target_modules must be a non-empty list of module names")
        if len(set(self.target_modules)) != len(self.target_modules):
            problems.append(f"target_modules has duplicates: {self.target_modules}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            problems.append(f"layers must be None or a non-empty list without duplicates, got {self.layers}")
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if not isinstance(self.polar_steps, int) or self.polar_steps < 1:
            problems.append(f"polar_steps must be a positive integer, got {self.polar_steps!r}")
        if not isinstance(self.window, int) or self.window < 1:
            problems.append(f"window must be a positive number of tokens, got {self.window!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not self.init_std > 0:
            problems.append(f"init_std must be positive, got {self.init_std!r}")
        if problems:
            raise ConfigError("invalid GeneratorConfig: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The adapted layers as non-negative indices (negative ones count from the end)."""
        if self.layers is None:
            return tuple(range(num_layers))
        bad = [i for i in self.layers if not -num_layers <= i < num_layers]
        if bad:
            raise ConfigError(f"layers {bad} out of range: the base model has {num_layers} decoder layers")
        indices = tuple(i % num_layers for i in self.layers)
        if len(set(indices)) != len(indices):
            raise ConfigError(f"layers {self.layers} name the same layer twice")
        return indices

    def validate_for(self, decoder_layers: nn.ModuleList) -> None:
        """Raise ConfigError unless every target exists as an nn.Linear wide enough for the rank."""
        for i in self.layer_indices(len(decoder_layers)):
            for target in self.target_modules:
                _, module = find_target(decoder_layers[i], target, i)
                if self.rank > min(module.in_features, module.out_features):
                    raise ConfigError(
                        f"rank {self.rank} exceeds the size of {target!r} in layer {i} "
                        f"({module.in_features} -> {module.out_features})"
                    )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeneratorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown GeneratorConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def find_target(layer: nn.Module, target: str, index: int) -> tuple[str, nn.Linear]:
    """The one nn.Linear in `layer` named `target` or ending in `.target` (as PEFT matches names)."""
    matches = [(name, m) for name, m in layer.named_modules() if name == target or name.endswith("." + target)]
    if len(matches) != 1:
        linear = sorted(name for name, m in layer.named_modules() if isinstance(m, nn.Linear))
        found = "not found" if not matches else f"ambiguous ({[n for n, _ in matches]})"
        raise ConfigError(f"target module {target!r} {found} in decoder layer {index}; its linear layers are {linear}")
    name, module = matches[0]
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"target {target!r} in layer {index} is {type(module).__name__}, not nn.Linear")
    return name, module


__all__ = ["ConfigError", "GeneratorConfig", "NORMALIZATIONS"]
