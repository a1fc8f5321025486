"""bf16 checkpoints: parameters stay bf16, outputs stay close to transformers in fp32, export is exact."""

from __future__ import annotations

import torch
from helpers import token_batch
from safetensors.torch import load_file

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_save.checkpoint.parity import max_abs_diff_vs_transformers, transformers_output
from megatron_save.testing import save_tiny_hf_model


def test_bf16_conversion(tmp_path):
    hf_dir = save_tiny_hf_model("qwen3", tmp_path / "hf", reward_model=True)
    meta = convert_hf_to_megatron(hf_dir, tmp_path / "mg", dtype="bf16")
    assert meta.dtype == "bf16"
    model, _, _ = build_model_from_checkpoint(tmp_path / "mg")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the scalar head too (computed in fp32)

    input_ids, mask = token_batch()
    diff = max_abs_diff_vs_transformers(tmp_path / "mg", hf_dir, input_ids, mask)
    scale = transformers_output(hf_dir, True, input_ids, mask).abs().max().item()
    assert 0.0 < diff < 0.02 * scale, (diff, scale)  # bf16 rounding is visible, but small

    exported = load_file(convert_megatron_to_hf(tmp_path / "mg", tmp_path / "out") / "model.safetensors")
    original = load_file(hf_dir / "model.safetensors")
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
