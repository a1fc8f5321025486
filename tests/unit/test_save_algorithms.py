"""SAVE's equations: hand-computed values, a per-prompt transcription of eqs. 14-21, the paper's Table 7 case."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_save.algorithms import (
    bt_loss,
    curriculum_threshold,
    pairwise_accuracy,
    save_partition,
    save_reward_loss,
    value_anchor_loss,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---- a direct, per-prompt transcription of the paper's equations (Python floats and lists) -----------------

def paper_threshold(t, T, m0):
    p = min(1 - m0 + t / T, 1)  # eq. 14
    return (2 - p) / 2


def paper_partition(R, V, mu):
    """R: list of lists (ragged groups), V: list -> per prompt (Y+, Y-) as index lists, B~ as index list."""
    sets = []
    for rewards, value in zip(R, V):
        a = [r - value for r in rewards]  # eq. 13
        kept = [j for j, aj in enumerate(a) if sigmoid(abs(aj)) >= mu]  # eq. 15
        sets.append(([j for j in kept if a[j] >= 0], [j for j in kept if a[j] < 0]))  # eq. 16
    b_tilde = [i for i, (pos, neg) in enumerate(sets) if pos and neg]  # eq. 17
    return sets, b_tilde


def paper_reward_loss(R, V, sets, b_tilde):
    total = 0.0
    for i in b_tilde:  # eq. 18
        pos, neg = sets[i]
        denominator = math.exp(V[i]) + sum(math.exp(R[i][k]) for k in pos)
        l_pos = -sum(math.log(math.exp(R[i][j]) / denominator) for j in pos) / len(pos)  # eq. 19
        l_neg = -math.log(math.exp(V[i]) / (math.exp(V[i]) + sum(math.exp(R[i][j]) for j in neg)))  # eq. 20
        total += l_pos + l_neg
    return total / len(b_tilde) if b_tilde else 0.0


def paper_value_loss(R, V):
    return sum((V[i] - sum(R[i]) / len(R[i])) ** 2 for i in range(len(R))) / len(R)  # eq. 21


def pad(R, G):
    rewards = torch.zeros(len(R), G, dtype=torch.float64)
    valid = torch.zeros(len(R), G, dtype=torch.bool)
    for i, row in enumerate(R):
        rewards[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        valid[i, : len(row)] = True
    return rewards, valid


# ---- hand-computed -----------------------------------------------------------------------------------------

def test_bt_loss_by_hand():
    assert bt_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(1 + math.exp(-1)))
    both = bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])).item()
    assert both == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2)
    assert bt_loss(torch.tensor([0.0]), torch.tensor([200.0])).item() == pytest.approx(200.0)  # stable, not inf
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])).item() == pytest.approx(1 / 3)


def test_curriculum_threshold_by_hand():
    assert curriculum_threshold(0, 320, 0.5) == pytest.approx(0.75)
    assert curriculum_threshold(80, 320, 0.5) == pytest.approx(0.625)
    assert curriculum_threshold(160, 320, 0.5) == pytest.approx(0.5)
    assert curriculum_threshold(320, 320, 0.5) == pytest.approx(0.5)
    assert curriculum_threshold(0, 10, 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total_steps"):
        curriculum_threshold(0, 0, 0.5)
    with pytest.raises(ValueError, match="initial_margin"):
        curriculum_threshold(0, 10, 1.5)


def test_partition_and_losses_by_hand():
    # One prompt, V = 0, rewards 1, -1, 0.1; mu = 0.6: sigmoid(0.1) = 0.525 < 0.6 drops the third.
    rewards = torch.tensor([[1.0, -1.0, 0.1]])
    values = torch.tensor([0.0])
    valid = torch.ones(1, 3, dtype=torch.bool)
    pos, neg, keep = save_partition(rewards, values, valid, 0.6)
    assert pos.tolist() == [[True, False, False]] and neg.tolist() == [[False, True, False]] and keep.tolist() == [True]
    # L+ = -log(e / (1 + e)), L- = -log(1 / (1 + e^-1))
    expected = -math.log(math.e / (1 + math.e)) - math.log(1 / (1 + math.exp(-1)))
    assert save_reward_loss(rewards, values, pos, neg, keep).item() == pytest.approx(expected, rel=1e-6)
    # value loss: (0 - mean(1, -1, 0.1))^2
    assert value_anchor_loss(values, rewards, valid).item() == pytest.approx((0.1 / 3) ** 2, rel=1e-6)


def test_table7_case_both_responses_land_in_y_plus():
    rewards = torch.tensor([[7.469, 7.719]])
    values = torch.tensor([5.375])
    valid = torch.ones(1, 2, dtype=torch.bool)
    for step in (0, 160, 320):  # at every point of the paper's curriculum (T = 320, m0 = 0.5)
        pos, neg, keep = save_partition(rewards, values, valid, curriculum_threshold(step, 320, 0.5))
        assert pos.tolist() == [[True, True]] and not neg.any()
        assert keep.tolist() == [False]  # no Y-: the pair is never pitted against itself
    assert save_reward_loss(rewards, values, pos, neg, keep).item() == 0.0


# ---- transcription on random ragged groups -----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_matches_per_prompt_transcription(seed):
    generator = torch.Generator().manual_seed(seed)
    B, G, T, m0 = 7, 6, 50, 0.5
    sizes = torch.randint(1, G + 1, (B,), generator=generator).tolist()
    R = [(torch.randn(n, generator=generator, dtype=torch.float64) * 2).tolist() for n in sizes]
    V = (torch.randn(B, generator=generator, dtype=torch.float64)).tolist()
    step = int(torch.randint(0, T, (1,), generator=generator))
    mu = paper_threshold(step, T, m0)
    assert curriculum_threshold(step, T, m0) == pytest.approx(mu)

    sets, b_tilde = paper_partition(R, V, mu)
    rewards, valid = pad(R, G)
    values = torch.tensor(V, dtype=torch.float64)
    pos, neg, keep = save_partition(rewards, values, valid, mu)
    for i, (pos_set, neg_set) in enumerate(sets):
        assert torch.nonzero(pos[i]).flatten().tolist() == pos_set
        assert torch.nonzero(neg[i]).flatten().tolist() == neg_set
    assert torch.nonzero(keep).flatten().tolist() == b_tilde

    loss = save_reward_loss(rewards, values, pos, neg, keep).item()
    assert loss == pytest.approx(paper_reward_loss(R, V, sets, b_tilde), rel=1e-5, abs=1e-6)
    assert value_anchor_loss(values, rewards, valid).item() == pytest.approx(paper_value_loss(R, V), rel=1e-5)


# ---- gradients, stability, degenerate batches --------------------------------------------------------------

def test_stop_gradients_and_padding_get_no_gradient():
    rewards = torch.tensor([[2.0, -3.0, float("nan")], [1.0, 0.5, 9.0]], requires_grad=True)
    values = torch.tensor([0.0, 0.7], requires_grad=True)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    pos, neg, keep = save_partition(rewards.detach(), values.detach(), valid, 0.5)
    save_reward_loss(rewards, values, pos, neg, keep).backward()
    assert values.grad is None or torch.all(values.grad == 0)
    assert torch.isfinite(rewards.grad).all() and rewards.grad[0, 2] == 0
    rewards.grad = None
    value_anchor_loss(values, rewards, valid).backward()
    assert rewards.grad is None or torch.all(rewards.grad == 0)
    assert torch.isfinite(values.grad).all() and values.grad.abs().sum() > 0


def test_no_prompt_kept_gives_zero_and_zero_gradient():
    rewards = torch.tensor([[3.0, 4.0], [-5.0, -6.0]], requires_grad=True)
    values = torch.zeros(2)
    pos, neg, keep = save_partition(rewards.detach(), values, torch.ones(2, 2, dtype=torch.bool), 0.5)
    assert not keep.any()
    loss = save_reward_loss(rewards, values, pos, neg, keep)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(rewards.grad == 0)


def test_large_rewards_are_stable():
    rewards = torch.tensor([[80.0, 75.0, -60.0, 52.0]], requires_grad=True)
    values = torch.tensor([55.0])
    pos, neg, keep = save_partition(rewards.detach(), values, torch.ones(1, 4, dtype=torch.bool), 0.75)
    assert keep.item()
    loss = save_reward_loss(rewards, values, pos, neg, keep)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rewards.grad).all()
    R, V = rewards.detach().double(), values.double()
    lse = torch.logsumexp(torch.stack([V[0], R[0, 0], R[0, 1]]), 0)
    expected = -((R[0, 0] - lse) + (R[0, 1] - lse)) / 2 - (V[0] - torch.logsumexp(torch.stack([V[0], R[0, 2], R[0, 3]]), 0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_nan_anchor_poisons_nothing():
    rewards = torch.tensor([[2.0, -3.0], [1.0, -1.0]], requires_grad=True)
    values = torch.tensor([float("nan"), 0.0])
    valid = torch.ones(2, 2, dtype=torch.bool)
    pos, neg, keep = save_partition(rewards.detach(), values, valid, 0.5)
    assert keep.tolist() == [False, True] and not (pos[0].any() or neg[0].any())
    loss = save_reward_loss(rewards, values, pos, neg, keep)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rewards.grad).all() and torch.all(rewards.grad[0] == 0)
