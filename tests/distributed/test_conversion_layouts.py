"""Conversion under torchrun: HF -> Megatron at TP / PP / EP layouts (each rank reading only its part) and the
streamed Megatron -> HF export (ranks taking turns over the model's parts) give back every HF tensor bit-exact
(tools launched as a user launches them)."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import hf_tensors, torchrun_tool
from megatron_save.checkpoint.model_checkpoint import read_checkpoint_meta


def assert_same_tensors(expected: Path, actual: Path) -> None:
    want, got = hf_tensors(expected), hf_tensors(actual)
    assert set(got) == set(want), set(got) ^ set(want)
    differing = [name for name in want if not torch.equal(want[name], got[name])]
    assert not differing, differing


def layout_args(tp: int = 1, pp: int = 1, ep: int = 1) -> list[str]:
    return ["--tp", str(tp), "--pp", str(pp), "--ep", str(ep)]


def test_dense_round_trip_under_torchrun(tiny_models, tmp_path):
    """Tied embeddings (the last stage's copy at import); the export's 7 parts over 3 ranks, unevenly."""
    model, export_ranks = "qwen2-lm", 3
    hf_dir = tiny_models[model]["hf"]
    ckpt, exported = tmp_path / "mg", tmp_path / "hf"
    torchrun_tool("convert_hf_to_megatron.py", 4, "--hf-dir", str(hf_dir), "--out", str(ckpt),
                  *layout_args(tp=2, pp=2))
    torchrun_tool("convert_megatron_to_hf.py", export_ranks, "--ckpt", str(ckpt), "--out", str(exported),
                  "--max-shard-size", "20KB")
    assert len(list(exported.glob("model-*-of-*.safetensors"))) > 1  # written shard by shard
    assert not list(exported.glob("*.tmp"))
    assert_same_tensors(hf_dir, exported)
    assert read_checkpoint_meta(ckpt)[0] == read_checkpoint_meta(tiny_models[model]["mg"])[0]


def test_moe_round_trip_under_torchrun_keeps_every_expert(tiny_moe_models, tmp_path):
    hf_dir = tiny_moe_models["qwen3_moe-rmv"]["hf"]
    ckpt, exported = tmp_path / "mg", tmp_path / "hf"
    torchrun_tool("convert_hf_to_megatron.py", 4, "--hf-dir", str(hf_dir), "--out", str(ckpt),
                  *layout_args(pp=2, ep=2))
    torchrun_tool("convert_megatron_to_hf.py", 2, "--ckpt", str(ckpt), "--out", str(exported))
    assert_same_tensors(hf_dir, exported)


def test_fresh_reward_head_does_not_depend_on_the_layout(tiny_models, tmp_path):
    """--as-reward-model at TP=2 x PP=2 draws the same reward head as in one process."""
    from megatron_save.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf

    hf_dir = tiny_models["qwen3-lm"]["hf"]
    torchrun_tool("convert_hf_to_megatron.py", 4, "--hf-dir", str(hf_dir), "--out", str(tmp_path / "mg4"),
                  "--as-reward-model", "--seed", "3", *layout_args(tp=2, pp=2))
    convert_hf_to_megatron(hf_dir, tmp_path / "mg1", as_reward_model=True, seed=3)
    convert_megatron_to_hf(tmp_path / "mg4", tmp_path / "hf4")
    convert_megatron_to_hf(tmp_path / "mg1", tmp_path / "hf1")
    assert_same_tensors(tmp_path / "hf1", tmp_path / "hf4")
    assert "score.weight" in hf_tensors(tmp_path / "hf4")
