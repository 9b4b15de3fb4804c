"""One call from "which model" to a ready GenerativeAdapterModel: base model + generator weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .base_model import DEFAULT_MODEL, load_base_model
from .memory.config import GeneratorConfig
from .memory.model import CONFIG_NAME, GenerativeAdapterModel

log = logging.getLogger(__name__)

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
"""Generator checkpoints shipped with the package, one folder per base model."""


def default_checkpoint(model_name: str | None) -> Path | None:
    """The shipped generator for the default model, if there is one."""
    folder = CHECKPOINTS / DEFAULT_MODEL
    if model_name in (None, DEFAULT_MODEL) and (folder / CONFIG_NAME).exists():
        return folder
    return None


def load_engine(model_name: str | None = None, checkpoint: str | Path | None = None, *,
                config: GeneratorConfig | None = None, device: str | torch.device | None = None,
                cache_dir: str | Path | None = None, use_shipped: bool = True,
                int4_decode: bool | None = None) -> GenerativeAdapterModel:
    """Base model (default: the embedded SmolLM2) plus its generator.

    checkpoint: a generator folder; None takes the shipped one for the default model (unless
    use_shipped is False). Without any, a freshly initialised generator is built from `config`.
    int4_decode: see load_base_model (None: on where it pays, the CPU).
    """
    loaded = load_base_model(model_name, device=device, cache_dir=cache_dir, int4_decode=int4_decode)
    if checkpoint is None and use_shipped:
        checkpoint = default_checkpoint(model_name)
    if checkpoint is not None:
        log.info("generator checkpoint: %s", checkpoint)
        return GenerativeAdapterModel.from_checkpoint(loaded.model, checkpoint, loaded.model_id, loaded.tokenizer)
    log.warning("new, UNTRAINED generator: its adapters remember nothing until it is trained")
    return GenerativeAdapterModel(loaded.model, config or GeneratorConfig(), loaded.model_id, loaded.tokenizer)
