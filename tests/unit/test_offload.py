"""Idle-state offload between stage-3 phases: gradient buffers are really freed and come back zeroed, only the
named model is resident, and optimizer offload is refused where it would move the model's own weights.

On CPU Megatron's optimizer ``offload_to_cpu`` has nothing to move (its tensors are not on CUDA); freeing the
gradient buffers releases their storage on any device, which is what is measured here."""

from __future__ import annotations

import pytest
import torch

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.trainers.offload import IdleOffload, OffloadSettings, optimizer_holds_model_weights
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state


def _grad_storage_sizes(state) -> list[int]:
    return [buffer.grad_data.untyped_storage().size() for buffer in state.model.buffers]


def _states(checkpoint):
    policy = build_train_state(build_model_from_checkpoint(checkpoint)[0], OptimizerSettings(lr=1e-3), 4)
    reward = build_train_state(build_model_from_checkpoint(checkpoint)[0], OptimizerSettings(lr=1e-3), 4)
    return {"policy": policy, "reward": reward}


def test_gradient_buffers_are_freed_while_idle_and_zeroed_when_back(tiny_models, world_of_one):
    states = _states(tiny_models["llama-lm"]["mg"])
    full = _grad_storage_sizes(states["policy"])
    assert all(size > 0 for size in full)
    for state in states.values():  # stale gradients that a restore must not bring back
        for buffer in state.model.buffers:
            buffer.grad_data.fill_(3.0)
    offload = IdleOffload(OffloadSettings(gradients=True), states, reference=None)
    assert sorted(offload.managed()) == ["policy", "reward"]

    offload.offload_all()
    assert _grad_storage_sizes(states["policy"]) == [0] * len(full)
    assert _grad_storage_sizes(states["reward"]) == [0] * len(full)
    with offload.resident("policy", "reference"):  # no reference is managed: ignored
        assert _grad_storage_sizes(states["policy"]) == full
        assert all(torch.count_nonzero(b.grad_data) == 0 for b in states["policy"].model.buffers)
        assert _grad_storage_sizes(states["reward"]) == [0] * len(full)
    assert _grad_storage_sizes(states["policy"]) == [0] * len(full)
    assert offload.offloaded == {"policy", "reward"}


def test_training_inside_resident_matches_training_without_offload(tiny_models, world_of_one):
    from helpers import token_batch

    from megatron_save.data.batching import DemonstrationBatch
    from megatron_save.trainers.sft import sft_loss
    from megatron_save.trainers.step import train_step

    input_ids, mask = token_batch(batch=2, seq=10)
    batch = DemonstrationBatch(input_ids=input_ids, attention_mask=mask, loss_mask=mask[:, 1:].clone())
    results = []
    for settings in (OffloadSettings(), OffloadSettings(gradients=True)):
        torch.manual_seed(0)
        states = _states(tiny_models["llama-lm"]["mg"])
        offload = IdleOffload(settings, states, reference=None)
        offload.offload_all()
        for _ in range(2):
            with offload.resident("policy"):
                train_step(states["policy"], [batch], sft_loss, ["loss"])
        results.append({n: p.detach().clone() for n, p in states["policy"].module.named_parameters()})
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name
    assert any(not torch.equal(value, before) for value, before in
               zip(results[0].values(), build_model_from_checkpoint(tiny_models["llama-lm"]["mg"])[0].parameters()))


def test_reference_moves_only_when_managed(tiny_models, world_of_one):
    reference = build_model_from_checkpoint(tiny_models["llama-lm"]["mg"])[0]
    moves = []
    reference.to = lambda device: moves.append(str(device))
    offload = IdleOffload(OffloadSettings(reference=True), {}, reference)
    assert offload.managed() == ["reference"]
    offload.offload_all()
    with offload.resident("reference"):
        pass
    assert moves == ["cpu", "cpu", "cpu"]  # off, back (the CPU is this machine's device), off again
    assert IdleOffload(OffloadSettings(), {}, reference).managed() == []


def test_optimizer_offload_is_refused_for_fp32_weights(tiny_models, world_of_one):
    states = _states(tiny_models["llama-lm"]["mg"])
    assert optimizer_holds_model_weights(states["policy"])
    with pytest.raises(ValueError, match=r"offload.optimizer=true: the policy optimizer steps the model's own fp32"):
        IdleOffload(OffloadSettings(optimizer=True), states, reference=None)
