"""The value-anchored reward model on a real (tiny) Megatron model: one forward gives R and V, and the losses'
gradients stay where the paper's stop-gradients put them."""

from __future__ import annotations

import pytest
import torch
from helpers import token_batch

from megatron_save.algorithms import save_partition, save_reward_loss, value_anchor_loss
from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.models.forward import last_token_index, score_sequences
from megatron_save.models.reward_model import read_scores
from megatron_save.testing import save_tiny_hf_model

VALUE_HEAD = "output_layer.value_head.weight"
REWARD_HEAD = "output_layer.reward_head.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("vam")
    hf_dir = save_tiny_hf_model("qwen3", root / "hf", reward_model=True, value_head=True, seed=3)
    convert_hf_to_megatron(hf_dir, root / "mg")
    model, meta, _ = build_model_from_checkpoint(root / "mg")
    assert meta.value_head
    return model


def _scores(model, groups: int = 2, group_size: int = 4):
    """R [B, G] and V [B] for B groups of G responses that share a prompt (the first 5 tokens)."""
    # Ids 3..99 at every position: a pad token (0) among the real tokens would move where the reward is read.
    input_ids = torch.randint(3, 100, (groups * group_size, 12), generator=torch.Generator().manual_seed(1))
    input_ids[:, :5] = input_ids[:: group_size, :5].repeat_interleave(group_size, dim=0)
    lengths = torch.tensor([12 - i % group_size for i in range(groups * group_size)])  # responses of 4..7 tokens
    mask = torch.arange(12)[None, :] < lengths[:, None]
    input_ids = input_ids.masked_fill(~mask, 0)
    model.train()
    position_ids = torch.arange(12).expand_as(input_ids)
    per_token = model(input_ids, position_ids, None)  # [N, S, 2]
    prompt_last = torch.full((input_ids.shape[0],), 4)
    rewards, values = read_scores(per_token, last_token_index(mask), prompt_last)
    return rewards.view(groups, group_size), values.view(groups, group_size), (input_ids, mask, prompt_last)


def _grads(model):
    return {name: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for name, p in model.named_parameters()}


def test_value_is_the_same_for_every_response_of_a_prompt(model):
    _, values, _ = _scores(model)
    assert torch.allclose(values, values[:, :1].expand_as(values), atol=1e-6)


def test_value_loss_trains_only_the_value_head(model):
    model.zero_grad()
    rewards, values, _ = _scores(model)
    value_anchor_loss(values[:, 0], rewards, torch.ones_like(rewards, dtype=torch.bool)).backward()
    grads = _grads(model)
    assert grads.pop(VALUE_HEAD) > 0
    assert all(g == 0 for g in grads.values()), {n: g for n, g in grads.items() if g}


def test_reward_loss_leaves_the_value_head_alone(model):
    model.zero_grad()
    rewards, values, _ = _scores(model)
    # Put the anchor in the middle of each group so that both Y+ and Y- are non-empty.
    anchor = rewards.detach().median(dim=1).values - 1e-3
    pos, neg, keep = save_partition(rewards.detach(), anchor, torch.ones_like(rewards, dtype=torch.bool), 0.5)
    assert keep.all()
    # V keeps its graph (the anchor's value, V's gradient path): only save_reward_loss's stop-gradient cuts it.
    values_as_anchor = values[:, 0] + (anchor - values[:, 0]).detach()
    save_reward_loss(rewards, values_as_anchor, pos, neg, keep).backward()
    grads = _grads(model)
    assert grads.pop(VALUE_HEAD) == 0
    assert grads.pop(REWARD_HEAD) > 0 and grads["decoder.layers.0.mlp.linear_fc1.weight"] > 0


def test_score_sequences_reads_r_and_v_from_one_forward(model):
    rewards, values, (input_ids, mask, prompt_last) = _scores(model)
    scores = score_sequences(model, input_ids, mask, micro_batch_size=4, prompt_lengths=prompt_last + 1)
    assert torch.allclose(scores.rewards, rewards.detach().flatten(), atol=1e-6)
    assert torch.allclose(scores.values, values.detach().flatten(), atol=1e-6)


def test_prompt_lengths_need_a_value_head(tmp_path):
    hf_dir = save_tiny_hf_model("llama", tmp_path / "hf", reward_model=True)
    convert_hf_to_megatron(hf_dir, tmp_path / "mg")
    plain, _, _ = build_model_from_checkpoint(tmp_path / "mg")
    input_ids, mask = token_batch()
    with pytest.raises(ValueError, match="no value head"):
        score_sequences(plain, input_ids, mask, 2, prompt_lengths=torch.full((4,), 3))
