"""Run and training checkpoints on a GPU: the CUDA RNG streams (the default generator's and Megatron's model-parallel
tracker's) come back from a run checkpoint, and the distributed optimizer, which a CPU machine cannot resume
(megatron-core 0.16's torch-AdamW path; tests/distributed/test_resume.py checks the refusal), resumes exactly with
Transformer Engine's FusedAdam."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import REPO
from megatron.core import tensor_parallel
from safetensors import safe_open

pytestmark = pytest.mark.gpu


def _draws() -> tuple[torch.Tensor, torch.Tensor]:
    """Draws from the default CUDA generator and from the tracker's model-parallel stream (as dropout inside a
    tensor-parallel region does)."""
    plain = torch.rand(8, device="cuda")
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(8, device="cuda")
    return plain, forked


def test_run_checkpoint_restores_the_cuda_rng_streams(tmp_path, world_of_one):
    from megatron_save.checkpoint.run_checkpoint import load_run_checkpoint, rng_file, save_run_checkpoint

    checkpoint = save_run_checkpoint(tmp_path, 3, {}, {"samples": 12}, keep=1, settings={})
    with safe_open(str(rng_file(checkpoint, 0)), framework="pt") as saved:
        names = set(saved.keys())
    assert "cuda" in names and "megatron.model-parallel-rng" in names, names
    expected = _draws()
    assert not torch.equal(*expected)  # two streams
    _draws()  # move both on
    assert load_run_checkpoint(checkpoint, {}) == (3, {"samples": 12})
    for name, before, after in zip(("default CUDA generator", "model-parallel tracker"), expected, _draws()):
        assert torch.equal(before, after), name


@pytest.fixture
def resume_worker():
    """tests/distributed/workers/resume_worker.py's steps and scoring (one process here: a GPU machine has one NCCL
    rank per GPU)."""
    sys.path.insert(0, str(REPO / "tests" / "distributed"))
    from workers import resume_worker

    return resume_worker


def test_distributed_optimizer_resumes_exactly(resume_worker, tiny_models, tmp_path, world_of_one):
    from transformers import AutoTokenizer

    from megatron_save.checkpoint import build_model_from_checkpoint
    from megatron_save.checkpoint.train_checkpoint import (
        distributed_optimizer_state_supported,
        load_train_checkpoint,
        save_train_checkpoint,
    )
    from megatron_save.data.preference import load_preference_pairs
    from megatron_save.testing.synthetic import synthetic_preference_rows, write_jsonl
    from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state, group_learning_rates

    if not distributed_optimizer_state_supported():
        pytest.skip("the distributed optimizer's state needs Transformer Engine or NVIDIA Apex (FusedAdam)")
    ckpt = tiny_models["llama-rmv"]["mg"]
    pairs, _ = load_preference_pairs(str(write_jsonl(synthetic_preference_rows(16, seed=5), tmp_path / "pairs.jsonl")),
                                     AutoTokenizer.from_pretrained(ckpt / "hf"), 128)

    def fresh_state():
        # The local spec: deterministic forward and backward on a GPU, so the two runs can be compared exactly.
        settings = OptimizerSettings(lr=1e-3, value_head_lr=3e-2, warmup_steps=1, decay_style="linear",
                                     min_lr_ratio=0.1, use_distributed_optimizer=True)
        model, _, _ = build_model_from_checkpoint(ckpt, spec_backend="local")
        return build_train_state(model, settings, total_steps=resume_worker.STEPS)

    straight = fresh_state()
    straight_losses = resume_worker.steps(straight, pairs, 0, resume_worker.STEPS)
    first = fresh_state()
    losses = resume_worker.steps(first, pairs, 0, 2)
    save_train_checkpoint(first, tmp_path / "ckpt", step=2)
    saved_lrs = group_learning_rates(first)
    resumed = fresh_state()
    assert load_train_checkpoint(resumed, tmp_path / "ckpt") == 2
    assert group_learning_rates(resumed) == saved_lrs
    assert saved_lrs["value_head"] != saved_lrs["backbone"]
    losses += resume_worker.steps(resumed, pairs, 2, resume_worker.STEPS)
    assert losses == pytest.approx(straight_losses, rel=1e-5, abs=1e-6)
    assert resume_worker.rewards_on(resumed, pairs) == pytest.approx(resume_worker.rewards_on(straight, pairs),
                                                                     rel=1e-4, abs=1e-5)
