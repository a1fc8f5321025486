"""Fixtures of the vLLM tier: tiny models whose attention head size vLLM's CPU backend runs (32: hidden 128 over
4 heads; the shared tiny models use 16 and 24), Llama (untied LM head) and Qwen2 (tied embeddings), in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_save.testing import save_tiny_hf_model

VLLM_FAMILIES = ("llama", "qwen2")
HEAD_DIM_32 = {"hidden_size": 128, "intermediate_size": 192}
"""Overrides of the tiny configs that give head_dim 32 (4 heads, 2 key-value groups, as the shared tiny models)."""


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{"llama": {"hf": dir, "new": dir, "mg": dir}, "qwen2": ...}: a tiny causal LM, another one of the same
    shape with other weights (what update_weights loads), and the first converted to Megatron (a stage-3
    policy)."""
    from megatron_save.checkpoint.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("vllm_models")
    models = {}
    for family in VLLM_FAMILIES:
        hf_dir = save_tiny_hf_model(family, root / f"{family}-hf", seed=7, **HEAD_DIM_32)
        new_dir = save_tiny_hf_model(family, root / f"{family}-new", seed=8, **HEAD_DIM_32)
        convert_hf_to_megatron(hf_dir, root / f"{family}-mg")
        models[family] = {"hf": hf_dir, "new": new_dir, "mg": root / f"{family}-mg"}
    return models


@pytest.fixture(scope="session")
def vllm_reward_model(tmp_path_factory) -> Path:
    """A tiny reward model with a value head (a stage-3 SAVE run's), converted to Megatron; vLLM never runs it."""
    from megatron_save.checkpoint.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("vllm_reward_model")
    hf_dir = save_tiny_hf_model("llama", root / "rmv-hf", reward_model=True, seed=7, value_head=True)
    convert_hf_to_megatron(hf_dir, root / "rmv-mg")
    return root / "rmv-mg"
