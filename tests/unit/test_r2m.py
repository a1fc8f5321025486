"""R2M's pieces: the time-step weight, the group reward entropy and GREBT against hand values and a per-group
transcription of eqs. 4-7, and the policy-feedback head."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_save.algorithms import grebt_loss, group_reward_entropy, r2m_time_weight


def test_time_weight_falls_from_one_to_its_floor():
    assert r2m_time_weight(0, 100, 0.6) == 1.0
    assert r2m_time_weight(25, 100, 0.6) == pytest.approx(0.5 * math.cos(math.pi / 4) + 0.5)
    assert r2m_time_weight(50, 100, 0.6) == 0.6  # cos gives 1/2, below the floor
    assert r2m_time_weight(100, 100, 0.0) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        r2m_time_weight(1, 0, 0.6)


def test_group_reward_entropy_by_hand():
    # [1, 2, 3]: mean 2, unbiased std 1, standardized [-1, 0, 1].
    p = [math.exp(z) / (math.exp(-1) + 1 + math.exp(1)) for z in (-1, 0, 1)]
    expected = -sum(q * math.log(q) for q in p)
    rewards = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    entropy = group_reward_entropy(rewards, valid)
    assert entropy[0].item() == pytest.approx(expected, rel=1e-5)
    assert entropy[1].item() == 0.0  # one response: no distribution to sharpen


def _grebt_transcription(rewards: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    bt, gre, pairs, groups = 0.0, 0.0, 0, 0
    for row, mask in zip(rewards, valid):
        r = row[mask]
        if len(r) < 2:
            continue
        groups += 1
        z = (r - r.mean()) / r.std()
        p = torch.softmax(z, 0)
        gre = gre - (p * p.log()).sum()
        if r.max() > r.min():
            pairs += 1
            bt = bt - torch.nn.functional.logsigmoid(r.max() - r.min())
    return (1 - alpha) * bt / max(pairs, 1) + alpha * gre / max(groups, 1)


def test_grebt_matches_the_equations():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 4, generator=generator, requires_grad=True)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    ours = grebt_loss(rewards, valid, alpha=0.3)
    theirs = _grebt_transcription(rewards, valid, alpha=0.3)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    (grad_ours,) = torch.autograd.grad(ours, rewards)
    (grad_theirs,) = torch.autograd.grad(theirs, rewards)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)
    assert grad_ours[2:4].abs().sum() == 0  # groups without a pair or two responses get no gradient


def test_r2m_head(world_of_one):
    from megatron.core.transformer import TransformerConfig

    from megatron_save.models.r2m import R2MHead

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    reward_head = torch.randn(1, 8)
    head = R2MHead(config, reward_hidden=8, policy_hidden=6, width=4, reward_head=reward_head, seed=3)
    same = R2MHead(config, reward_hidden=8, policy_hidden=6, width=4, reward_head=reward_head, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), same.parameters()))  # seeded, rank-independent
    state, hidden = torch.randn(3, 8), torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    # omega = 1: the reward model's own reward, whatever the policy says.
    assert torch.allclose(head(state, hidden, mask, 1.0), (state @ reward_head.T)[:, 0], atol=1e-6)
    mixed = head(state, hidden, mask, 0.6)
    changed = hidden.clone()
    changed[0, 3:] = 100.0  # padding of row 0
    assert torch.allclose(head(state, changed, mask, 0.6), mixed, atol=1e-6)
    changed[1, 4] = 100.0  # a real position of row 1
    assert not torch.allclose(head(state, changed, mask, 0.6)[1], mixed[1])
