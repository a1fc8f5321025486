"""Streaming reads and sharded writes of Hugging Face safetensors checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsReader:
    """Reads one tensor at a time from a (possibly sharded) safetensors checkpoint directory.

    ``side_files`` are further safetensors files in the directory whose tensors join the checkpoint's.
    """

    def __init__(self, model_dir: str | Path, side_files: tuple[str, ...] = ()):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.model_dir / SINGLE_FILE).exists():
            with safe_open(self.model_dir / SINGLE_FILE, framework="pt") as handle:
                self.weight_map = {name: SINGLE_FILE for name in handle.keys()}
        else:
            raise FileNotFoundError(
                f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
            )
        for side_file in side_files:
            with safe_open(self.model_dir / side_file, framework="pt") as handle:
                self.weight_map.update({name: side_file for name in handle.keys()})

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped from its shard.

        The shard is opened for this tensor alone: a handle held open keeps every page read through it resident,
        so a whole conversion would end up holding the model's bytes; the tensor's pages go when it does.
        """
        if name not in self.weight_map:
            raise KeyError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        with safe_open(self.model_dir / self.weight_map[name], framework="pt") as handle:
            return handle.get_tensor(name)


@dataclass(frozen=True)
class ShardFile:
    """A safetensors shard written under a temporary name, until ``name_shards`` gives it its final one."""

    path: Path
    """Where it is now."""
    names: list[str]
    """The tensors it holds."""
    nbytes: int
    """Their bytes."""


def write_shard_files(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                      max_shard_bytes: int = 5 * 2**30, prefix: str = "") -> list[ShardFile]:
    """Writes named tensors in arrival order into shards of at most ``max_shard_bytes`` under temporary names
    (``<prefix>shard-<i>.tmp``), each as it fills, so at most one shard is held beyond what the caller holds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard in _pack(tensors, max_shard_bytes):
        path = out_dir / f"{prefix}shard-{len(shards) + 1:05d}.tmp"
        save_file(shard, path, metadata={"format": "pt"})
        shards.append(ShardFile(path, list(shard), sum(t.numel() * t.element_size() for t in shard.values())))
    return shards


def name_shards(shards: list[ShardFile], out_dir: str | Path) -> list[Path]:
    """Renames shards, in order, to ``model-<i>-of-<n>.safetensors`` (one alone: ``model.safetensors``) and writes
    the index that ``from_pretrained`` reads for more than one."""
    out_dir = Path(out_dir)
    count = len(shards)
    weight_map, paths = {}, []
    for i, shard in enumerate(shards, start=1):
        final = out_dir / (SINGLE_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors")
        shard.path.rename(final)
        paths.append(final)
        weight_map.update({name: final.name for name in shard.names})
    if count > 1:
        index = {"metadata": {"total_size": sum(shard.nbytes for shard in shards)}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return paths


def write_sharded_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, max_shard_bytes: int = 5 * 2**30
) -> list[Path]:
    """Writes named tensors in arrival order into shards of at most ``max_shard_bytes`` plus the index file."""
    return name_shards(write_shard_files(tensors, out_dir, max_shard_bytes), out_dir)


def _pack(tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        size += nbytes
    if shard:
        yield shard
