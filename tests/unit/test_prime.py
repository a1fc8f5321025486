"""PRIME's equations (arXiv 2502.01456): implicit process rewards (eq. 3), the PRM's cross-entropy (eq. 4), outcome
labels and the accuracy filter, and the advantages (eq. 5) against hand values and a direct transcription."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_save.algorithms import (
    accuracy_filter,
    implicit_prm_loss,
    implicit_process_rewards,
    outcome_labels,
    prime_advantages,
)


def test_implicit_process_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref_logp = torch.tensor([[-1.5, -2.0, -2.0]])
    mask = torch.tensor([[True, True, False]])
    assert implicit_process_rewards(logp, ref_logp, mask, beta=0.5).tolist() == [[0.25, 0.0, 0.0]]


def test_prm_loss_by_hand_and_its_gradient_reaches_the_prm_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref_logp = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, sequence_rewards = implicit_prm_loss(logp, ref_logp, mask, torch.tensor([1.0, 0.0]), beta=0.5)
    assert sequence_rewards.tolist() == pytest.approx([0.25, -0.25])
    # label 1: -log sigmoid(0.25); label 0: -log(1 - sigmoid(-0.25)) = -log sigmoid(0.25)
    expected = math.log(1 + math.exp(-0.25))
    assert loss.tolist() == pytest.approx([expected, expected])
    loss.sum().backward()
    assert ref_logp.grad is None or not ref_logp.grad.any()
    assert logp.grad[0, 2] == 0 and logp.grad[0, 0] != 0  # masked tokens get no gradient


def test_outcome_labels_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [2.0, 2.0, 1.0, 5.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, False]])
    assert outcome_labels(rewards, valid, "above_group_mean").tolist() == [[0, 0, 1, 0], [1, 1, 0, 0]]
    assert outcome_labels(rewards, valid, "top_of_group").tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]  # first on ties
    with pytest.raises(ValueError, match="unknown outcome label rule 'median'"):
        outcome_labels(rewards, valid, "median")


def test_accuracy_filter_by_hand():
    labels = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 3, [True] * 3, [False] * 3, [True, True, False]])
    assert accuracy_filter(labels, valid, 0.2, 0.8).tolist() == [True, False, False, True]
    assert accuracy_filter(labels, valid, 0.0, 1.0).tolist() == [True, True, False, True]


def test_advantages_by_hand():
    # One prompt, two responses: y1 has process rewards [1, 3], y2 [2]; labels 1 and 0. K = 2, so each token
    # reward becomes 2 r_t - (mean 2 + mean 2) / 1: y1 [-2, 2] -> returns [0, 2]; y2 [0] -> [0]. The labels' RLOO
    # [1, -1] sits on each last token, and with gamma = 1 reaches every earlier one.
    process = torch.tensor([[[1.0, 3.0], [2.0, 0.0]]])
    token_mask = torch.tensor([[[True, True], [True, False]]])
    kept = torch.tensor([[True, True]])
    advantages = prime_advantages(process, token_mask, torch.tensor([[1.0, 0.0]]), kept, 1.0, 1.0, whiten=False)
    assert advantages.tolist() == [[[1.0, 3.0], [-1.0, 0.0]]]
    # The paper's eq. 5 as printed (baseline: the other responses' mean, 2) would give y1 [1, 2]: refused above.


def test_advantages_by_hand_three_responses_and_a_discount():
    # K = 3 process rewards y1 [3, 0], y2 [1], y3 [2, 2, 2]: means 1.5, 1, 2, total 4.5.
    # r_t * 3/2 - 4.5/2: y1 [2.25, -2.25], y2 [-0.75], y3 [0.75, 0.75, 0.75]. Labels [1, 0, 0]: RLOO [1, -0.5, -0.5]
    # on the last tokens. process_coef 2, outcome_coef 4, gamma 0.5: token rewards y1 [4.5, -4.5 + 4] = [4.5, -0.5]
    # -> returns [4.25, -0.5]; y2 [-1.5 - 2] -> [-3.5]; y3 [1.5, 1.5, 1.5 - 2] -> [1.5 + 0.5 * 1.25, 1.5 - 0.25, -0.5]
    process = torch.tensor([[[3.0, 0.0, 9.0], [1.0, 9.0, 9.0], [2.0, 2.0, 2.0]]])
    token_mask = torch.tensor([[[True, True, False], [True, False, False], [True, True, True]]])
    kept = torch.tensor([[True, True, True]])
    outcome = torch.tensor([[1.0, 0.0, 0.0]])
    advantages = prime_advantages(process, token_mask, outcome, kept, 2.0, 4.0, gamma=0.5, whiten=False)
    expected = [[[4.25, -0.5, 0.0], [-3.5, 0.0, 0.0], [2.125, 1.25, -0.5]]]
    torch.testing.assert_close(advantages, torch.tensor(expected), rtol=0, atol=1e-6)


def released_prime_returns(process, token_mask, outcome, kept, process_coef, outcome_coef, gamma):
    """A restatement, with Python loops, of PRIME's released advantage code: PRIME-RL/PRIME (commit 18ad596),
    training/verl/trainer/ppo/core_algos.py, compute_rloo_returns (verl's recipe/prime/prime_core_algos.py,
    compute_rloo_advantage_return.masked_rloo, has the same formula). For each reward source, within a group of K:
    every reward position's value r becomes r * K / (K - 1) - (sum over the group of each response's mean reward
    over its positions) / (K - 1); the process source's positions are the response tokens, the verifier's
    ("gt_scores") the last token alone; each source is discounted by gamma from the end, the sources summed."""
    batch, group, steps = process.shape
    result = torch.zeros(batch, group, steps)
    for b in range(batch):
        members = [g for g in range(group) if kept[b, g]]
        k = len(members)
        if k < 2:
            continue
        lengths = {g: int(token_mask[b, g].sum()) for g in members}
        means = {g: sum(float(process[b, g, t]) for t in range(lengths[g])) / lengths[g] for g in members}
        process_sum = sum(means.values())
        outcome_sum = sum(float(outcome[b, g]) for g in members)
        for i in members:
            rewards = [process_coef * (float(process[b, i, t]) * k / (k - 1) - process_sum / (k - 1))
                       for t in range(lengths[i])]
            rewards[-1] += outcome_coef * (float(outcome[b, i]) * k / (k - 1) - outcome_sum / (k - 1))
            running = 0.0
            for t in reversed(range(lengths[i])):
                running = rewards[t] + gamma * running
                result[b, i, t] = running
    return result


def released_whiten(values, mask):
    """The released verl_F.masked_whiten: (x - masked mean) * rsqrt(unbiased masked variance + 1e-8)."""
    chosen = values[mask].double()
    mean = chosen.mean()
    variance = ((chosen - mean) ** 2).sum() / (len(chosen) - 1)
    return ((values.double() - mean) / (variance + 1e-8).sqrt()).float().masked_fill(~mask, 0.0)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_advantages_match_the_released_code(gamma):
    generator = torch.Generator().manual_seed(3)
    batch, group, steps = 5, 4, 7
    process = torch.randn(batch, group, steps, generator=generator)
    lengths = torch.randint(1, steps + 1, (batch, group), generator=generator)
    token_mask = torch.arange(steps) < lengths[..., None]
    outcome = (torch.rand(batch, group, generator=generator) > 0.5).float()
    kept = torch.rand(batch, group, generator=generator) > 0.25
    kept[0] = False
    kept[1] = torch.tensor([True, False, False, False])  # a single kept response: no baseline, advantage 0
    kept[2] = True
    expected = released_prime_returns(process, token_mask, outcome, kept, 5.0, 2.0, gamma)
    actual = prime_advantages(process, token_mask, outcome, kept, 5.0, 2.0, gamma=gamma, whiten=False)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not actual[:2].any()

    whitened = prime_advantages(process, token_mask, outcome, kept, 5.0, 2.0, gamma=gamma)
    mask = token_mask & kept[..., None] & (kept.sum(dim=1) >= 2)[:, None, None]
    torch.testing.assert_close(whitened, released_whiten(expected, mask), rtol=1e-5, atol=1e-5)


def test_the_released_baseline_is_not_the_printed_one():
    """The two readings differ by (r_t - mean_i) / (K - 1) on every process token: a test that compares against
    the released formula must see it."""
    process = torch.tensor([[[1.0, 3.0], [2.0, 0.0], [0.0, 0.0]]])
    token_mask = torch.tensor([[[True, True], [True, False], [True, False]]])
    kept = torch.tensor([[True, True, True]])
    outcome = torch.zeros(1, 3)
    released = prime_advantages(process, token_mask, outcome, kept, 1.0, 0.0, whiten=False)
    printed = torch.zeros_like(released)  # r_t - mean of the other responses' means, then the return-to-go
    means = [2.0, 2.0, 0.0]
    for i, length in enumerate([2, 1, 1]):
        baseline = sum(m for j, m in enumerate(means) if j != i) / 2
        shaped = [float(process[0, i, t]) - baseline for t in range(length)]
        for t in range(length):
            printed[0, i, t] = sum(shaped[t:])
    # y1: (r_t - 2) / 2 summed from t: [(-1 + 1) / 2, 1 / 2] = [0, 0.5]; y2, y3 have one token: r_t = mean_i.
    assert (released - printed).tolist() == [[[0.0, 0.5], [0.0, 0.0], [0.0, 0.0]]]
