"""Shared fixtures: tiny HF models of every family, built in-process from configs, and their conversions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_save.testing import TINY_FAMILIES, TINY_MOE_FAMILIES, save_tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{"llama-lm": {"hf": dir, "mg": dir}, "llama-rm": ..., ...} for every tiny family, LM and RM, plus
    "llama-rmv", a reward model with a value head.

    Conversion runs in this process as a world of one (gloo) through the package's converter.
    """
    from megatron_save.checkpoint.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for family in TINY_FAMILIES:
        for kind, reward_model in (("lm", False), ("rm", True)):
            name = f"{family}-{kind}"
            hf_dir = save_tiny_hf_model(family, root / f"{name}-hf", reward_model=reward_model, seed=7)
            convert_hf_to_megatron(hf_dir, root / f"{name}-mg")
            models[name] = {"hf": hf_dir, "mg": root / f"{name}-mg"}
    # A value-anchored reward model: R and V from one forward.
    hf_dir = save_tiny_hf_model("llama", root / "llama-rmv-hf", reward_model=True, seed=7, value_head=True)
    convert_hf_to_megatron(hf_dir, root / "llama-rmv-mg")
    models["llama-rmv"] = {"hf": hf_dir, "mg": root / "llama-rmv-mg"}
    return models


@pytest.fixture(scope="session")
def tiny_moe_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{"qwen3_moe-lm": {"hf": dir, "mg": dir}, "qwen3_moe-rmv": ...}: a tiny MoE causal LM and a MoE reward
    model with a value head, converted in this process."""
    from megatron_save.checkpoint.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("tiny_moe")
    models = {}
    for family in TINY_MOE_FAMILIES:
        for kind, reward_model in (("lm", False), ("rmv", True)):
            name = f"{family}-{kind}"
            hf_dir = save_tiny_hf_model(family, root / f"{name}-hf", reward_model=reward_model, seed=7,
                                        value_head=reward_model)
            convert_hf_to_megatron(hf_dir, root / f"{name}-mg")
            models[name] = {"hf": hf_dir, "mg": root / f"{name}-mg"}
    return models


@pytest.fixture
def world_of_one():
    """torch.distributed and Megatron's groups in this process, as a single rank at TP=1, PP=1.

    One world serves the whole session (conversions and in-process runs join it too): init_distributed keeps a
    running default group and replaces Megatron's groups, destroying the previous ones, so the process holds
    one set of groups (and their gloo threads) however many tests ask for it. pytest_sessionfinish ends it.
    """
    from megatron_save.config import ParallelConfig
    from megatron_save.distributed import init_distributed

    init_distributed(ParallelConfig())


@pytest.fixture
def te(world_of_one):
    """A world of one on a GPU where Transformer Engine imports. Tests that take it (directly or through another
    fixture) are skipped at collection where it does not (pytest_collection_modifyitems), before any fixture runs."""


def pytest_collection_modifyitems(config, items):
    """The tiers that need another environment skip, with the reason, where it is missing: ``gpu`` without CUDA,
    ``vllm`` where vLLM does not import, ``slurm`` without a running Slurm cluster, and a test that takes a fixture
    needing Transformer Engine on a GPU without it (helpers.tier_skip_reason). Decided here, at collection, so no
    fixture of a skipped test runs."""
    import importlib.util

    import torch
    from helpers import slurm_missing, tier_skip_reason

    from megatron_save.models.spec import transformer_engine_missing

    cuda = torch.cuda.is_available()
    te_missing = transformer_engine_missing() if cuda else None
    vllm_missing = None if importlib.util.find_spec("vllm") else "needs real vLLM (.ci/vllm_tier.sh builds it)"
    slurm = slurm_missing() if any("slurm" in item.keywords for item in items) else None
    for item in items:
        reason = tier_skip_reason({mark.name for mark in item.iter_markers()}, set(getattr(item, "fixturenames", ())),
                                  cuda, te_missing, vllm_missing, slurm)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_sessionfinish(session, exitstatus):
    """Destroys the in-process world, if any test started one, and with it every process group."""
    init = sys.modules.get("megatron_save.distributed.init")
    if init is not None and init.dist.is_initialized():
        init.shutdown_distributed()


@pytest.fixture(scope="session")
def rl_data(tmp_path_factory) -> dict[str, Path]:
    """Stage-3 inputs: synthetic RL prompts and preference pairs (for offline_bt), as jsonl files."""
    from megatron_save.testing.synthetic import synthetic_preference_rows, synthetic_prompts, write_jsonl

    root = tmp_path_factory.mktemp("rl_data")
    return {"prompts": write_jsonl(synthetic_prompts(64, seed=3), root / "prompts.jsonl"),
            "pairs": write_jsonl(synthetic_preference_rows(32, seed=4), root / "pairs.jsonl")}
