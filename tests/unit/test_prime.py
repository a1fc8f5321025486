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
    # One prompt, two responses: y1 has process rewards [1, 3], y2 [2]; labels 1 and 0.
    process = torch.tensor([[[1.0, 3.0], [2.0, 0.0]]])
    token_mask = torch.tensor([[[True, True], [True, False]]])
    kept = torch.tensor([[True, True]])
    advantages = prime_advantages(process, token_mask, torch.tensor([[1.0, 0.0]]), kept, 1.0, 1.0, whiten=False)
    # Means 2 and 2: each baseline is 2; shaped y1 [-1, 1] -> returns [0, 1]; y2 [0] -> [0]. RLOO of labels [1, -1].
    assert advantages.tolist() == [[[1.0, 2.0], [-1.0, 0.0]]]


def transcribed_advantages(process, token_mask, outcome, kept, process_coef, outcome_coef, gamma):
    """PRIME's eq. 5 written out with Python loops over prompts, responses and tokens."""
    batch, group, steps = process.shape
    result = torch.zeros(batch, group, steps)
    for b in range(batch):
        members = [g for g in range(group) if kept[b, g]]
        k = len(members)
        if k < 2:
            continue
        mean_reward = {}
        for g in members:
            tokens = [float(process[b, g, t]) for t in range(steps) if token_mask[b, g, t]]
            mean_reward[g] = sum(tokens) / len(tokens)
        for i in members:
            baseline = sum(mean_reward[j] for j in members if j != i) / (k - 1)
            outcome_term = float(outcome[b, i]) - sum(float(outcome[b, j]) for j in members if j != i) / (k - 1)
            length = int(token_mask[b, i].sum())
            for t in range(length):
                ret = sum(gamma ** (s - t) * (float(process[b, i, s]) - baseline) for s in range(t, length))
                result[b, i, t] = process_coef * ret + outcome_coef * outcome_term
    return result


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_advantages_match_the_transcription(gamma):
    generator = torch.Generator().manual_seed(3)
    batch, group, steps = 5, 4, 7
    process = torch.randn(batch, group, steps, generator=generator)
    lengths = torch.randint(1, steps + 1, (batch, group), generator=generator)
    token_mask = torch.arange(steps) < lengths[..., None]
    outcome = (torch.rand(batch, group, generator=generator) > 0.5).float()
    kept = torch.rand(batch, group, generator=generator) > 0.25
    kept[0] = False
    kept[1] = torch.tensor([True, False, False, False])  # a single kept response: no baseline, advantage 0
    expected = transcribed_advantages(process, token_mask, outcome, kept, 5.0, 2.0, gamma)
    actual = prime_advantages(process, token_mask, outcome, kept, 5.0, 2.0, gamma=gamma, whiten=False)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not actual[:2].any()

    whitened = prime_advantages(process, token_mask, outcome, kept, 5.0, 2.0, gamma=gamma)
    mask = token_mask & kept[..., None] & (kept.sum(dim=1) >= 2)[:, None, None]
    values = expected[mask]
    torch.testing.assert_close(whitened[mask], (values - values.mean()) / values.var().add(1e-8).sqrt(),
                               rtol=1e-5, atol=1e-5)
    assert not whitened[~mask].any()
