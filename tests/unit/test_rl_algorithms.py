"""Critic-free RL math: hand-computed values and the published formulas (GRPO, RLOO, GSPO, k3 as in verl)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_save.algorithms import (
    grpo_advantages,
    gspo_policy_loss,
    kl_penalty,
    ppo_clip_policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from megatron_save.algorithms.policy_loss import aggregate


def test_grpo_by_hand_and_dr_grpo():
    scores = torch.tensor([[1.0, 2.0, 3.0, 0.0], [5.0, 5.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False], [True, False, False, False]])
    advantages = grpo_advantages(scores, valid)
    # group 0: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + eps); group 1: std 0, centred values 0 -> 0 / eps = 0;
    # group 2: a single response has no baseline -> 0
    assert advantages[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-5)
    assert advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0] and advantages[2].tolist() == [0.0] * 4
    assert grpo_advantages(scores, valid, norm_by_std=False)[0].tolist() == [-1.0, 0.0, 1.0, 0.0]


def test_grpo_matches_the_published_formula_on_random_groups():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 8, generator=generator)
    valid = torch.rand(6, 8, generator=generator) > 0.3
    valid[:, :2] = True
    advantages = grpo_advantages(scores, valid, eps=1e-6)
    for i in range(6):
        group = scores[i][valid[i]]
        expected = (group - group.mean()) / (group.std(unbiased=True) + 1e-6)  # GRPO paper / verl
        assert torch.allclose(advantages[i][valid[i]], expected, atol=1e-5)


def test_rloo_is_leave_one_out():
    scores = torch.tensor([[1.0, 2.0, 6.0]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    # 1 - (2 + 6) / 2 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5
    assert rloo_advantages(scores, valid)[0].tolist() == [-3.0, -1.5, 4.5]


def test_reinforce_pp_whitens_returns_over_tokens():
    token_rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # outcome rewards on the last token
    token_rewards[1, 0] = -1.0  # a one-token response
    mask = torch.tensor([[True, True], [True, False]])
    advantages = reinforce_pp_advantages(token_rewards, mask)
    # returns 1, 1, -1 -> mean 1/3, unbiased var ((2/3)^2 * 2 + (4/3)^2) / 2 = 4/3
    expected = torch.tensor([2 / 3, 2 / 3, -4 / 3]) / math.sqrt(4 / 3 + 1e-8)
    assert torch.allclose(advantages[mask], expected, atol=1e-6) and advantages[1, 1] == 0


def test_reinforce_pp_baseline_centres_groups_first():
    scores = torch.tensor([[1.0, 3.0], [10.0, 10.0]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    token_mask = torch.ones(2, 2, 3, dtype=torch.bool)
    advantages = reinforce_pp_baseline_advantages(scores, valid, token_mask)
    # centred: group 0 -> (-1, 1) on 3 tokens each, group 1 -> (0, 0); whitened over the 12 tokens: mean 0,
    # unbiased variance 6 / 11
    scale = 1 / math.sqrt(6 / 11 + 1e-8)
    assert torch.allclose(advantages[0, 0], torch.full((3,), -scale)) and torch.allclose(advantages[0, 1], torch.full((3,), scale))
    assert torch.all(advantages[1] == 0)


def test_ppo_clip_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = ppo_clip_policy_loss(logp, old, advantages, mask, clip_low=0.2, clip_high=0.28)
    # token 0: ratio 1.5, A 1 -> max(-1.5, -1.28) = -1.28 (clipped); token 1: ratio .5 -> max(-.5, -.8) = -.5;
    # token 2: ratio 1, A -2 -> 2
    assert out.loss.item() == pytest.approx((-1.28 - 0.5 + 2.0) / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    dual = ppo_clip_policy_loss(torch.log(torch.tensor([[5.0]])), torch.zeros(1, 1), torch.tensor([-1.0]),
                                torch.ones(1, 1, dtype=torch.bool), 0.2, 0.2, dual_clip=3.0)
    assert dual.loss.item() == pytest.approx(3.0)  # min(max(5, 1.2), 3)


def test_aggregations_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(losses, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(losses, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(losses, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(losses, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 2 / 3)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(losses, mask, "mean")


def test_gspo_matches_the_sequence_level_objective():
    generator = torch.Generator().manual_seed(1)
    logp = (torch.randn(5, 7, generator=generator) * 0.3 - 2).requires_grad_()
    old = logp.detach() + torch.randn(5, 7, generator=generator) * 0.2
    mask = torch.arange(7)[None, :] < torch.tensor([7, 5, 3, 6, 1])[:, None]
    advantages = torch.randn(5, generator=generator)
    out = gspo_policy_loss(logp, old, advantages, mask, clip_low=3e-4, clip_high=4e-4)
    (grad,) = torch.autograd.grad(out.loss, logp)

    logp2 = logp.detach().clone().requires_grad_()
    s = torch.exp(((logp2 - old) * mask).sum(1) / mask.sum(1))  # GSPO paper: length-normalised sequence ratio
    objective = torch.minimum(s * advantages, s.clamp(1 - 3e-4, 1 + 4e-4) * advantages).mean()
    (expected_grad,) = torch.autograd.grad(-objective, logp2)
    assert out.loss.item() == pytest.approx(-objective.item(), rel=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-6)


def test_gspo_reads_token_advantages_on_real_tokens_only():
    """[N, T] advantages (as the trainer builds them: zero on prompt positions, the response's advantage on its
    tokens) give the loss and gradient of the [N] per-response advantages."""
    generator = torch.Generator().manual_seed(2)
    logp = (torch.randn(3, 6, generator=generator) * 0.3 - 2).requires_grad_()
    old = logp.detach() + torch.randn(3, 6, generator=generator) * 0.1
    mask = torch.tensor([[False, True, True, True, False, False], [False, False, True, True, True, True],
                         [True, True, False, False, False, False]])
    per_response = torch.tensor([0.7, -1.3, 2.0])
    token_advantages = torch.where(mask, per_response[:, None], torch.full((3, 6), 9.0))  # 9: never read
    by_token = gspo_policy_loss(logp, old, token_advantages, mask, 0.2, 0.2)
    by_response = gspo_policy_loss(logp, old, per_response, mask, 0.2, 0.2)
    (grad_token,) = torch.autograd.grad(by_token.loss, logp)
    (grad_response,) = torch.autograd.grad(by_response.loss, logp)
    assert by_token.loss.item() == pytest.approx(by_response.loss.item()) and by_token.loss.item() != 0
    assert torch.allclose(grad_token, grad_response) and grad_token.abs().sum() > 0


def test_rloo_matches_the_published_formula_with_masked_members():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 6, generator=generator)
    valid = torch.rand(5, 6, generator=generator) > 0.3
    valid[:, :2] = True
    advantages = rloo_advantages(scores, valid)
    for i in range(5):
        members = valid[i].nonzero().flatten().tolist()
        for j in members:  # Kool et al. 2019 / Ahmadian et al. 2024: r_j - mean of the other k - 1 rewards
            others = [scores[i, k].item() for k in members if k != j]
            assert advantages[i, j].item() == pytest.approx(scores[i, j].item() - sum(others) / len(others),
                                                            abs=1e-5)
        assert torch.all(advantages[i][~valid[i]] == 0)


def test_k3_is_an_unbiased_estimate_of_the_exact_kl():
    """Averaged under pi, k3 (and k1) give KL(pi || pi_ref) exactly; the gradient of the per-token k3 is
    1 - pi_ref / pi with respect to log pi (Schulman 2020, verl's low_var_kl)."""
    generator = torch.Generator().manual_seed(4)
    pi = torch.softmax(torch.randn(10, generator=generator), 0)
    ref = torch.softmax(pi.log() + 0.5 * torch.randn(10, generator=generator), 0)  # k3 stays below its clamp
    exact = (pi * (pi.log() - ref.log())).sum()
    for kind in ("k1", "k3"):
        estimate = (pi * kl_penalty(pi.log()[None], ref.log()[None], kind)[0]).sum()
        assert estimate.item() == pytest.approx(exact.item(), rel=1e-5), kind
    logp = pi.log()[None].clone().requires_grad_()
    (grad,) = torch.autograd.grad(kl_penalty(logp, ref.log()[None], "k3").sum(), logp)
    assert torch.allclose(grad[0], 1 - ref / pi, atol=1e-5)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(0.5) - math.log(0.25)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(d)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(d * d / 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - math.log(0.5) - 1)  # r - log r - 1, r = ref/pi
    assert kl_penalty(torch.tensor([[0.0]]), torch.tensor([[30.0]]), "k3").item() == 10.0  # clamped
    with pytest.raises(ValueError, match="KL kind"):
        kl_penalty(logp, ref, "k4")


def test_padding_and_far_off_policy_tokens_stay_finite():
    logp = torch.tensor([[-1.0, float("nan")], [50.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0], [-50.0, -1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    for out in (ppo_clip_policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2),
                gspo_policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2)):
        (grad,) = torch.autograd.grad(out.loss, logp)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and grad[0, 1] == 0


def test_k3_gradient_stays_finite_far_from_the_reference():
    logp = torch.tensor([[-100.0, -1.0]], requires_grad=True)
    kl = kl_penalty(logp, torch.tensor([[0.0, -1.0]]), "k3")
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
