"""Idle-state offload between stage-3 phases: gradient buffers are really freed and come back zeroed, only the
named model is resident, and the optimizer offload selects the optimizer's own tensors, never the model's weights.

Freeing gradient buffers releases their storage on any device, which is measured here. Moving optimizer tensors
to host memory moves nothing on CPU (they are there already): what is tested is which tensors would move; on a GPU
machine they move (tests/gpu/test_gpu_offload.py measures the device memory). The models use the local spec: its
forward and backward are deterministic on a GPU too, so the trained weights compare exactly."""

from __future__ import annotations

import pytest
import torch

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.distributed.init import compute_device
from megatron_save.trainers.offload import (
    IdleOffload,
    OffloadSettings,
    optimizer_back,
    optimizer_own_tensors,
    optimizer_to_host,
)
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state


def _grad_storage_sizes(state) -> list[int]:
    return [buffer.grad_data.untyped_storage().size() for buffer in state.model.buffers]


def _model(checkpoint):
    return build_model_from_checkpoint(checkpoint, spec_backend="local")[0]


def _states(checkpoint):
    policy = build_train_state(_model(checkpoint), OptimizerSettings(lr=1e-3), 4)
    reward = build_train_state(_model(checkpoint), OptimizerSettings(lr=1e-3), 4)
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
    results = []
    for settings in (OffloadSettings(), OffloadSettings(optimizer=True, gradients=True)):
        torch.manual_seed(0)
        states = _states(tiny_models["llama-lm"]["mg"])
        offload = IdleOffload(settings, states, reference=None)
        offload.offload_all()
        for _ in range(2):
            with offload.resident("policy"):
                _one_step(states["policy"])
        results.append({n: p.detach().clone() for n, p in states["policy"].module.named_parameters()})
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name
    assert any(not torch.equal(value, before) for value, before in
               zip(results[0].values(), _model(tiny_models["llama-lm"]["mg"]).parameters()))


def test_reference_moves_only_when_managed(tiny_models, world_of_one):
    reference = _model(tiny_models["llama-lm"]["mg"])
    moves = []
    reference.to = lambda device: moves.append(str(device))
    offload = IdleOffload(OffloadSettings(reference=True), {}, reference)
    assert offload.managed() == ["reference"]
    offload.offload_all()
    with offload.resident("reference"):
        pass
    assert moves == ["cpu", str(compute_device()), "cpu"]  # off, back (on CPU machines the CPU), off again
    assert IdleOffload(OffloadSettings(), {}, reference).managed() == []


def _one_step(state) -> None:
    from helpers import token_batch

    from megatron_save.data.batching import DemonstrationBatch
    from megatron_save.trainers.sft import sft_loss
    from megatron_save.trainers.step import train_step

    input_ids, mask = token_batch(batch=2, seq=10)
    batch = DemonstrationBatch(input_ids=input_ids, attention_mask=mask, loss_mask=mask[:, 1:].clone())
    train_step(state, [batch], sft_loss, ["loss"])


def test_optimizer_offload_leaves_fp32_weights_in_place(tiny_models, world_of_one):
    state = _states(tiny_models["llama-lm"]["mg"])["policy"]
    _one_step(state)
    params, slots = optimizer_own_tensors(state)
    assert params == []  # fp32 training: every group parameter is a model weight, stepped in place
    keys = {key for values, key in slots}
    assert {"exp_avg", "exp_avg_sq"} <= keys
    assert len([1 for _, key in slots if key == "exp_avg"]) == len(list(state.module.parameters()))
    on_device = [(values, key) for values, key in slots if values[key].device.type != "cpu"]
    assert len(on_device) >= (2 * len(list(state.module.parameters())) if torch.cuda.is_available() else 0)
    moved = optimizer_to_host(state)  # on a CPU machine all of it is on the host already
    assert moved.params == [] and len(moved.slots) == len(on_device)
    assert all(values[key].device.type == "cpu" for values, key in slots)
    optimizer_back(moved)
    assert all(values[key].device == device for values, key, device in moved.slots)


@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed_optimizer"])
def test_optimizer_offload_of_a_bf16_reward_model_selects_its_fp32_main_copies(distributed, tiny_models,
                                                                                world_of_one, tmp_path):
    from megatron_save.checkpoint.convert import convert_hf_to_megatron

    convert_hf_to_megatron(tiny_models["llama-rmv"]["hf"], tmp_path / "bf16", dtype="bf16")
    model = _model(tmp_path / "bf16")
    state = build_train_state(model, OptimizerSettings(lr=1e-3, use_distributed_optimizer=distributed), 4)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    params, _ = optimizer_own_tensors(state)
    # One fp32 main copy per bf16 weight (a shard of it with the distributed optimizer), heads included.
    assert all(p.dtype == torch.float32 for p in params)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.parameters())
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(p.untyped_storage().data_ptr() in model_storages for p in params)
