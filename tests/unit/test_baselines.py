"""The paper's RM baselines as tensor functions: Mean Reward's anchor and HL-BT's pairs, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_save.algorithms import (
    highest_lowest_pairs,
    hl_bt_loss,
    mean_reward_anchor,
    save_partition,
    save_reward_loss,
)


def test_mean_reward_anchor_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 9.0], [4.0, float("nan"), 0.0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    assert mean_reward_anchor(rewards, valid).tolist() == [1.5, 4.0]


def test_mean_reward_baseline_runs_through_the_save_loss():
    rewards = torch.tensor([[1.0, 3.0]], requires_grad=True)
    valid = torch.ones(1, 2, dtype=torch.bool)
    anchor = mean_reward_anchor(rewards, valid)  # 2: one response above, one below
    pos, neg, keep = save_partition(rewards.detach(), anchor, valid, 0.5)
    loss = save_reward_loss(rewards, anchor, pos, neg, keep)
    expected = -math.log(math.exp(3) / (math.exp(2) + math.exp(3))) - math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hl_bt_pairs_and_loss_by_hand():
    rewards = torch.tensor([[7.469, 7.719, 0.0], [1.0, 1.0, 5.0], [2.0, 2.0, 2.0], [3.0, 0.0, 0.0]],
                           requires_grad=True)
    valid = torch.tensor([[True, True, False], [True, True, False], [True, True, True], [True, False, False]])
    best, worst, has_pair = highest_lowest_pairs(rewards, valid)
    # Table 7: HL-BT pits the two equivalent answers against each other (SAVE puts both in Y+)
    assert (best[0].item(), worst[0].item()) == (1, 0)
    assert has_pair.tolist() == [True, False, False, False]  # ties and singletons give no pair
    loss = hl_bt_loss(rewards, valid)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-(7.719 - 7.469))), rel=1e-5)
    loss.backward()
    assert rewards.grad[0, 1] < 0 < rewards.grad[0, 0] and torch.all(rewards.grad[1:] == 0)


def test_hl_bt_without_pairs_is_zero_with_zero_gradient():
    rewards = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = hl_bt_loss(rewards, torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(rewards.grad == 0)


def test_hl_bt_with_grades_pairs_by_the_grades_not_the_rewards():
    # Group 0: the RM prefers response 1, the verifier response 0 -> the pair is (0 over 1), against the RM.
    # Group 1: grades tie -> no pair, whatever the rewards. Group 2: response 2 invalid, never paired.
    rewards = torch.tensor([[1.0, 3.0, 0.0], [0.0, 5.0, 1.0], [2.0, 0.5, 9.0]], requires_grad=True)
    grades = torch.tensor([[0.9, 0.1, 0.5], [0.4, 0.4, 0.4], [0.2, 0.6, 1.0]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    loss = hl_bt_loss(rewards, valid, grades)
    # pairs: group 0 best 0 / worst 1 (margin 1 - 3 = -2), group 2 best 1 / worst 0 (margin 0.5 - 2 = -1.5)
    expected = (math.log1p(math.exp(2.0)) + math.log1p(math.exp(1.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert rewards.grad[0, 0] < 0 < rewards.grad[0, 1] and torch.all(rewards.grad[1] == 0)
    assert rewards.grad[2, 2] == 0
