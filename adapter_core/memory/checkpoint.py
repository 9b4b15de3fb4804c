"""Sharded safetensors files for generator weights (each shard small enough for git and transfers)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAX_SHARD_BYTES = 16 * 1024 * 1024
INDEX_NAME = "generator.safetensors.index.json"


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_sharded(tensors: dict[str, torch.Tensor], folder: str | Path,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write tensors into shards of at most max_shard_bytes of tensor data, plus an index file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes > max_shard_bytes:
            raise ValueError(f"tensor {name} ({nbytes} bytes) is larger than a shard ({max_shard_bytes} bytes)")
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in folder.glob("generator-*-of-*.safetensors"):
        old.unlink()
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"generator-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path))
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    index = {"weight_map": weight_map, "sha256": tensor_digest(tensors)}
    _write_atomic(folder / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True))
    return paths


def load_sharded(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        raise FileNotFoundError(f"no generator checkpoint in {folder} (missing {INDEX_NAME})")
    index = json.loads(index_path.read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(folder / shard)))
    if set(tensors) != set(index["weight_map"]):
        raise ValueError(f"checkpoint in {folder} is incomplete: shards do not match the index")
    if tensor_digest(tensors) != index["sha256"]:
        raise ValueError(f"checkpoint in {folder} failed its checksum")
    return tensors


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
