"""Idle-state offload on a GPU moves real tensors: the optimizer's own tensors (fp32 main copies of bf16 weights and
Adam's moments), the gradient buffers and the reference weights leave device memory between phases and come back
for their phase; the model weights the rollout sync and scoring need never leave. On CPU
(tests/unit/test_offload.py) only the selection of what would move can be checked."""

from __future__ import annotations

import pytest
import torch
from helpers import token_batch

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.trainers.offload import IdleOffload, OffloadSettings, optimizer_own_tensors
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state

pytestmark = pytest.mark.gpu


def _one_step(state) -> float:
    from megatron_save.data.batching import DemonstrationBatch
    from megatron_save.trainers.sft import sft_loss
    from megatron_save.trainers.step import train_step

    input_ids, mask = token_batch(batch=2, seq=12)
    batch = DemonstrationBatch(input_ids=input_ids, attention_mask=mask, loss_mask=mask[:, 1:].clone())
    return train_step(state, [batch], sft_loss, ["loss"])["loss"]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _device_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_offload_frees_and_restores_device_memory(tiny_models, world_of_one, tmp_path):
    convert_hf_to_megatron(tiny_models["llama-lm"]["hf"], tmp_path / "bf16", dtype="bf16")
    states = {name: build_train_state(build_model_from_checkpoint(tmp_path / "bf16")[0], OptimizerSettings(lr=1e-3), 4)
              for name in ("policy", "reward")}
    for state in states.values():
        _one_step(state)  # Adam's moments exist from the first step on
    reference = build_model_from_checkpoint(tmp_path / "bf16")[0]

    own = {name: optimizer_own_tensors(state) for name, state in states.items()}
    moving = []
    for params, slots in own.values():
        assert params and all(p.is_cuda and p.dtype == torch.float32 for p in params)  # fp32 main copies
        moving += params + [values[key] for values, key in slots if values[key].is_cuda]
    grads = [b.grad_data for state in states.values() for b in state.model.buffers]
    expected = _bytes(moving) + _bytes(grads) + _bytes(reference.parameters())
    weights = {name: [p.data_ptr() for p in state.module.parameters()] for name, state in states.items()}

    offload = IdleOffload(OffloadSettings(optimizer=True, gradients=True, reference=True), states, reference)
    before = _device_bytes()
    offload.offload_all()
    freed = before - _device_bytes()
    assert freed >= 0.95 * expected, (freed, expected)
    assert all(not p.is_cuda for p in reference.parameters())
    for name, (params, slots) in own.items():
        assert all(not p.is_cuda for p in params) and all(not values[key].is_cuda for values, key in slots), name
        assert all(p.is_cuda for p in states[name].module.parameters())  # the weights stay
        assert [p.data_ptr() for p in states[name].module.parameters()] == weights[name]

    with offload.resident("policy"):
        params, slots = own["policy"]
        assert all(p.is_cuda for p in params) and all(values[key].is_cuda for values, key in slots
                                                        if key != "step")
        loss = _one_step(states["policy"])
        assert torch.isfinite(torch.tensor(loss))
    with offload.resident("reference"):
        assert all(p.is_cuda for p in reference.parameters())
    offload.restore(*offload.managed())
    # Everything is back: the device holds what it held before (the policy's step in between allocated nothing that
    # outlives it beyond allocator rounding).
    assert abs(_device_bytes() - before) <= 0.05 * expected + 2**20
