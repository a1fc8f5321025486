"""SAVE's RM-update loss over micro-batches of response groups adds up to the whole batch's eqs. 18-21."""

from __future__ import annotations

import pytest
import torch
from helpers import token_batch

from megatron_save.algorithms import save_partition, save_reward_loss, value_anchor_loss
from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.data.batching import ResponseGroupBatch
from megatron_save.models.forward import last_token_index
from megatron_save.testing import save_tiny_hf_model
from megatron_save.trainers.losses import save_rm_loss

PROMPTS, GROUP = 4, 3


def test_micro_batch_sums_make_the_global_means(tmp_path):
    hf_dir = save_tiny_hf_model("llama", tmp_path / "hf", reward_model=True, value_head=True, seed=4)
    convert_hf_to_megatron(hf_dir, tmp_path / "mg")
    model, _, _ = build_model_from_checkpoint(tmp_path / "mg")
    input_ids, mask = token_batch(batch=PROMPTS * GROUP, seq=12, seed=3)
    mask[:, :6] = True
    prompt_lengths = torch.full((PROMPTS * GROUP,), 4)
    valid = torch.ones(PROMPTS * GROUP, dtype=torch.bool)
    valid[-1] = False  # a filtered-out slot
    with torch.no_grad():
        scores = model(input_ids, torch.arange(12).expand_as(input_ids), None)
    rows = torch.arange(PROMPTS * GROUP)
    rewards = scores[rows, last_token_index(mask), 0].view(PROMPTS, GROUP)
    values = scores[rows, 3, 1].view(PROMPTS, GROUP)[:, 0]
    threshold = 0.5 + 1e-3
    pos, neg, keep = save_partition(rewards, values, valid.view(PROMPTS, GROUP), threshold)
    expected_reward = save_reward_loss(rewards, values, pos, neg, keep)
    expected_value = value_anchor_loss(values, rewards, valid.view(PROMPTS, GROUP))

    micro_batches, data_parallel = 2, 1
    batch = ResponseGroupBatch(input_ids, mask, prompt_lengths, valid, valid.clone(), GROUP, threshold,
                               sum_scale=micro_batches * data_parallel, value_scale=micro_batches * data_parallel / PROMPTS)
    parts = [save_rm_loss(part, scores[i * 6 : (i + 1) * 6], value_loss_weight=0.5)
             for i, part in enumerate(batch.split(GROUP * 2))]
    kept = sum(out["reward_count"] for _, out in parts)
    assert kept == keep.sum()  # each micro-batch partitions its own groups: together, the batch's partition
    reward_sum = sum(out["reward_loss_sum"] for _, out in parts)
    assert (reward_sum / kept).item() == pytest.approx(expected_reward.item(), rel=1e-5)
    assert torch.equal(torch.cat([out["rewards"] for _, out in parts]), rewards.flatten())
    assert torch.equal(torch.cat([out["values"] for _, out in parts]), values)
    # What Megatron's averaging makes of the losses: the reward sum (divided by |B~| after the pass) and the mean
    # value loss.
    total = sum(loss / micro_batches for loss, _ in parts)
    assert total.item() == pytest.approx(reward_sum.item() + 0.5 * expected_value.item(), rel=1e-5)


def test_the_value_loss_gives_the_backbone_no_gradient(tiny_models, world_of_one):
    """The value loss (eq. 21) alone trains the value head and leaves every other gradient exactly zero. (R and V
    leave the model as one tensor, so autograd still runs the backbone's backward on zeros: a backward-hook
    counter on the decoder layers sees it, 4 calls here; removing that work needs separate head outputs.)"""
    model, _, _ = build_model_from_checkpoint(tiny_models["llama-rmv"]["mg"])
    input_ids, mask = token_batch(batch=PROMPTS * GROUP, seq=12, seed=5)
    mask[:, :6] = True
    scores = model(input_ids, torch.arange(12).expand_as(input_ids), None)
    rewards = scores[torch.arange(PROMPTS * GROUP), last_token_index(mask), 0].view(PROMPTS, GROUP)
    values = scores[:, 3, 1].view(PROMPTS, GROUP)[:, 0]
    value_anchor_loss(values, rewards, torch.ones(PROMPTS, GROUP, dtype=torch.bool)).backward()
    for name, param in model.named_parameters():
        moved = param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert moved == ("value_head" in name), name
