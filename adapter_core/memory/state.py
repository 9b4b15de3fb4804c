"""AdapterState: one user's memory: the generator's un-normalised running sums S per adapted
module, or (adapter_core.memory.finetune) a LoRA pair of its own per module.

A state is tied to the generator checkpoint and base model that produced it: sums made by one
generator mean nothing to another. Serialised as safetensors with metadata and a sha256 over
tensors and metadata, so that a damaged or edited file is refused instead of silently used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .checkpoint import tensor_digest

FORMAT = "generative-adapter-state/1"
PAIR_PREFIX = "pair."
"""Stored name of a fine-tuned pair's tensors: 'pair.<module>.lora_A' and 'pair.<module>.lora_B'."""


class StateError(ValueError):
    """A state file that is damaged, or does not belong to the generator/base model at hand."""


@dataclass
class AdapterState:
    sums: dict[str, torch.Tensor]
    """Adapted module name -> running sum S, (r, r) fp32 on the CPU."""
    generator_id: str
    """Id of the generator checkpoint that made the sums."""
    base_model_id: str
    """Id of the frozen base model the generator belongs to."""
    tokens: int = 0
    """Tokens absorbed so far."""
    windows: int = 0
    """Windows absorbed so far."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form string metadata kept with the state (for example the app's cursor)."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """A fine-tuned state's adapter (adapter_core.memory.finetune; its sums are empty): module name ->
    (lora_A (r, d_in), lora_B (d_out, r)) fp32 on the CPU, scaling folded into lora_B. Modules
    without a pair add nothing."""

    @property
    def is_empty(self) -> bool:
        return self.tokens == 0

    def check_compatible(self, generator_id: str, base_model_id: str) -> None:
        if self.generator_id != generator_id:
            raise StateError(
                f"state was made by generator {self.generator_id!r}, not by the loaded generator {generator_id!r}; "
                "rebuild it from the history"
            )
        if self.base_model_id != base_model_id:
            raise StateError(
                f"state was made for base model {self.base_model_id!r}, not {base_model_id!r}; rebuild it"
            )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as stored: the sums under their module names, the pairs under PAIR_PREFIX."""
        tensors = dict(self.sums)
        for name, (lora_a, lora_b) in self.pairs.items():
            tensors[f"{PAIR_PREFIX}{name}.lora_A"], tensors[f"{PAIR_PREFIX}{name}.lora_B"] = lora_a, lora_b
        return tensors

    # --- serialisation -------------------------------------------------------------------------

    def _metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "generator_id": self.generator_id,
            "base_model_id": self.base_model_id,
            "tokens": str(self.tokens),
            "windows": str(self.windows),
            "extra": json.dumps(self.extra, sort_keys=True),
        }

    def to_bytes(self) -> bytes:
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self._tensors().items()}
        metadata = self._metadata()
        metadata["sha256"] = _digest(tensors, metadata)
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, generator_id: str | None = None,
                   base_model_id: str | None = None) -> "AdapterState":
        """Parse and verify; with ids given, also refuse a state made for another generator/model."""
        try:
            tensors = st_load(data)
            metadata = _read_metadata(data)
        except (SafetensorError, ValueError, UnicodeDecodeError) as e:
            raise StateError(f"not a readable adapter state file: {e}") from e
        if metadata.get("format") != FORMAT:
            raise StateError(f"not an adapter state (format {metadata.get('format')!r}, expected {FORMAT!r})")
        claimed = metadata.pop("sha256", None)
        if claimed != _digest(tensors, metadata):
            raise StateError("adapter state failed its checksum: the file was damaged or edited")
        try:
            sums = {name: t for name, t in tensors.items() if not name.startswith(PAIR_PREFIX)}
            pairs = {name[len(PAIR_PREFIX):-len(".lora_A")]: (t, tensors[name[:-len("lora_A")] + "lora_B"])
                     for name, t in tensors.items() if name.startswith(PAIR_PREFIX) and name.endswith(".lora_A")}
            state = cls(
                sums=sums, pairs=pairs,
                generator_id=metadata["generator_id"],
                base_model_id=metadata["base_model_id"],
                tokens=int(metadata["tokens"]),
                # files written before the field was renamed call it "chunks"
                windows=int(metadata["windows"] if "windows" in metadata else metadata["chunks"]),
                extra=json.loads(metadata["extra"]),
            )
        except (KeyError, ValueError) as e:
            raise StateError(f"adapter state metadata is incomplete: {e}") from e
        if generator_id is not None or base_model_id is not None:
            state.check_compatible(generator_id or state.generator_id, base_model_id or state.base_model_id)
        return state

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, generator_id: str | None = None,
             base_model_id: str | None = None) -> "AdapterState":
        return cls.from_bytes(Path(path).read_bytes(), generator_id, base_model_id)


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    payload = json.dumps(metadata, sort_keys=True) + tensor_digest(tensors)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header.
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len].decode("utf-8"))
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise ValueError("no metadata in header")
    return metadata
