"""Token-budget pieces without a model: the gradient cache of a rollout update gives the parameters the whole-group
loss's gradient over any split of the rows, the reward model's slot partition and its row batches, and the policy
update's token-budget micro-batches and loss scales."""

from __future__ import annotations

import random

import pytest
import torch
from test_stage3_batches import _groups, _rows

from megatron_save.algorithms import (
    highest_lowest_pairs,
    hl_bt_loss,
    mean_reward_anchor,
    save_partition,
    save_reward_loss,
    value_anchor_loss,
)
from megatron_save.data.token_budget import micro_batch_tokens
from megatron_save.trainers.losses import group_loss_gradients
from megatron_save.trainers.stage3.batches import (
    mini_batch_layout,
    policy_budget_parts,
    policy_budget_scales,
    policy_token_rows,
    response_slot_partition,
    scored_row_batches,
)
from megatron_save.trainers.strategies import STRATEGIES

B, G, FEATURES = 5, 4, 6


def _whole_group_objective(kind: str, rewards, values, trained, threshold, grades, value_loss_weight):
    """The fixed micro-batches' objective transcribed from the algorithms: reward sum (+ weighted value mean)."""
    if kind in ("hl_bt", "verifier_hl_bt"):
        pairs = highest_lowest_pairs(rewards if grades is None else grades, trained)[2].sum()
        return hl_bt_loss(rewards, trained, grades) * pairs
    anchor = values if kind.startswith("save") else mean_reward_anchor(rewards, trained)
    pos, neg, keep = save_partition(rewards, anchor, trained, threshold)
    objective = save_reward_loss(rewards, anchor, pos, neg, keep) * keep.sum()
    if kind.startswith("save"):
        # value_anchor_loss is the mean over prompts with a trained response: value_sum / value_count.
        objective = objective + value_loss_weight * value_anchor_loss(values, rewards, trained)
    return objective


@pytest.mark.parametrize("kind", ["save", "save_no_curriculum", "mean_reward", "hl_bt", "verifier_hl_bt"])
def test_the_gradient_cache_gives_the_whole_group_gradient_over_any_split(kind):
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(B, G, FEATURES, generator=generator)
    prompt_features = torch.randn(B, FEATURES, generator=generator)
    weight = torch.randn(FEATURES, generator=generator, requires_grad=True)  # "backbone + reward head"
    value_weight = torch.randn(FEATURES, generator=generator, requires_grad=True)  # "value head"
    trained = torch.rand(B, G, generator=generator) > 0.2
    grades = torch.rand(B, G, generator=generator) if kind == "verifier_hl_bt" else None
    threshold = 0.6 if kind == "save" else 0.5

    rewards, values = features @ weight, prompt_features @ value_weight  # [B, G], [B]
    expected = torch.autograd.grad(_whole_group_objective(kind, rewards, values, trained, threshold, grades, 0.7),
                                   [weight, value_weight], allow_unused=True)
    expected = [torch.zeros(FEATURES) if g is None else g for g in expected]

    terms, reward_grad, value_grad = group_loss_gradients(STRATEGIES[kind].group_terms, rewards.detach(),
                                                          values.detach(), trained, threshold, grades, 0.7)
    # Forward-backward of the surrogate over a random split of the rows (a group spans several parts).
    slots = list(range(B * G))
    random.Random(1).shuffle(slots)
    for start in range(0, B * G, 3):
        part = torch.tensor(slots[start : start + 3])
        i, j = part // G, part % G
        row_rewards = (features[i, j] @ weight)
        row_values = prompt_features[i] @ value_weight
        carries_value = (j == 0).float()  # V's gradient rides on slot 0 of its group
        (row_rewards * reward_grad[i, j] + row_values * value_grad[i] * carries_value).sum().backward()
    assert torch.allclose(weight.grad, expected[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(value_weight.grad, expected[1], rtol=1e-5, atol=1e-7)
    assert weight.grad.abs().sum() > 0
    assert terms.reward_sum.item() == pytest.approx(
        _whole_group_objective(kind, rewards, values, trained, threshold, grades, 0.0).item(), rel=1e-6)


def test_every_strategy_that_updates_on_its_own_scores_has_group_terms():
    for strategy in STRATEGIES.values():
        if strategy.scores_in_update and strategy.trains_backbone:
            assert strategy.group_terms is not None, strategy.name


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_the_slot_partition_covers_every_slot_once_with_one_count_and_the_budget(ranks):
    valid = [[True, True, False], [True, False, False], [False, False, False], [True, True, True], [True, False, True]]
    groups = _groups(valid)
    longest = max(len(s) for row in groups.rm_sequences for s in row)
    budget = 2 * longest
    parts = response_slot_partition(groups, budget, ranks)
    assert len({len(rank_parts) for rank_parts in parts}) == 1  # the same count on every rank
    flat = [slot for rank_parts in parts for part in rank_parts for slot in part]
    per_rank = -(-5 // ranks)
    assert sorted(flat) == list(range(per_rank * ranks * 3))
    for rank, rank_parts in enumerate(parts):
        batches = scored_row_batches(groups, rank_parts, 0, ranks, torch.ones(5, 3), torch.arange(5.0) + 1)
        for part, batch in zip(rank_parts, batches):
            assert all(rank * per_rank * 3 <= slot < (rank + 1) * per_rank * 3 for slot in part)
            assert micro_batch_tokens([int(n) for n in batch.attention_mask.sum(dim=1)]) <= budget
            assert batch.input_ids.shape[1] == int(batch.attention_mask.sum(dim=1).max())  # its own longest row
            assert batch.loss_scale == len(rank_parts) * ranks
            for k, slot in enumerate(part):
                i, j = divmod(slot, 3)
                assert batch.value_grad[k] == (i + 1 if j == 0 and i < 5 else 0)
                assert batch.reward_grad[k] == (1.0 if i < 5 else 0.0)


@pytest.mark.parametrize("token_mean", [True, False])
@pytest.mark.parametrize("ranks, parts", [(1, 1), (2, 2), (3, 1)])
def test_policy_budget_scales_average_to_the_whole_mini_batch(token_mean, ranks, parts):
    rows = _rows(((3, 4), (5, 2), (2, 6), (4, 1), (3, 3), (2, 5), (6, 2)))
    lengths = [len(s) for s in rows.sequences]
    budget = 2 * max(lengths)
    layout = mini_batch_layout(len(rows.sequences), parts, ranks, 1)
    generator = torch.Generator().manual_seed(3)
    per_token = [torch.randn(n, generator=generator) for n in rows.response_lengths]
    every_rank = [policy_budget_parts(layout, rank, lengths, budget) for rank in range(ranks)]
    for k, part in enumerate(layout):
        assert len({len(rank_parts[k]) for rank_parts in every_rank}) == 1
        real = [i for share in part for i in share if i >= 0]
        expected = (torch.cat([per_token[i] for i in real]).mean() if token_mean
                    else torch.stack([per_token[i].mean() for i in real]).sum() / len(real))
        averaged = 0.0
        for rank in range(ranks):
            rank_parts = every_rank[rank]
            scales = policy_budget_scales(layout, rank, rank_parts, rows.response_lengths, token_mean)
            offset = sum(len(p[rank]) for p in layout[:k])
            input_ids, mask, _, _ = policy_token_rows(rows, layout, rank, 0)
            for micro, scale in zip(rank_parts[k], scales[k]):
                ids = [layout[k][rank][pos - offset] for pos in micro]
                assert micro_batch_tokens([int(mask[pos].sum()) for pos in micro]) <= budget
                if token_mean:
                    tokens = [per_token[i] for i in ids if i >= 0]
                    mean = torch.cat(tokens).mean() if tokens else torch.tensor(0.0)
                else:
                    mean = torch.stack([per_token[i].mean() if i >= 0 else torch.tensor(0.0) for i in ids]).mean()
                averaged += (scale * mean).item() / (len(scales[k]) * ranks)
        assert averaged == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
