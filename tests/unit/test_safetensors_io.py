"""Sharded safetensors writing and streaming reads."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_save.checkpoint.safetensors_io import INDEX_FILE, SafetensorsReader, write_sharded_safetensors


def test_writes_shards_with_index_and_reads_back(tmp_path):
    tensors = [(f"t{i}", torch.full((256,), float(i))) for i in range(5)]  # 1 KiB each
    paths = write_sharded_safetensors(iter(tensors), tmp_path, max_shard_bytes=2048)
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    reader = SafetensorsReader(tmp_path)
    assert reader.names() == {name for name, _ in tensors}
    for name, tensor in tensors:
        assert torch.equal(reader.get(name), tensor)
    assert not list(tmp_path.glob("*.tmp"))


def test_single_shard_has_no_index(tmp_path):
    write_sharded_safetensors([("a", torch.ones(3))], tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / INDEX_FILE).exists()


def test_missing_tensor_is_named(tmp_path):
    write_sharded_safetensors([("a", torch.ones(3))], tmp_path)
    with pytest.raises(KeyError, match="tensor 'b' is missing"):
        SafetensorsReader(tmp_path).get("b")
