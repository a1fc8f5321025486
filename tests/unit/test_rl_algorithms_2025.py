"""CISPO, GMPO, rollout correction (TIS / rejection sampling) and DAPO's overlong shaping and group filter:
hand-computed values and independent per-element transcriptions of the published formulas (MiniMax-M1 eqs. 4-5,
GMPO eq. 3 with verl's sign-aware log-space clip, verl's rollout_corr_helper, DAPO eq. 13)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_save.algorithms import (
    cispo_policy_loss,
    gmpo_policy_loss,
    groups_with_spread,
    mismatch_metrics,
    mismatch_sums,
    overlong_penalty,
    ppo_clip_policy_loss,
    rollout_correction_weights,
)

CPU_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "cpu" / "stage3_save.yaml"


def _batch(seed: int = 0, n: int = 5, t: int = 7):
    generator = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, t, generator=generator) * 3).requires_grad_()
    old_logp = logp.detach() + 0.4 * torch.randn(n, t, generator=generator)
    advantages = torch.randn(n, generator=generator)
    lengths = torch.randint(2, t + 1, (n,), generator=generator)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return logp, old_logp, advantages, mask


def test_cispo_by_hand():
    # r = exp(0.5) = 1.65 (clipped to 1.28), exp(-0.1) = 0.905 (inside), exp(-1) = 0.368 (no lower bound: 1 - 1)
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old_logp = torch.tensor([[-1.5, -1.9, -2.0]])
    out = cispo_policy_loss(logp, old_logp, torch.tensor([2.0]), torch.ones(1, 3, dtype=torch.bool),
                            clip_low=1.0, clip_high=0.28)
    weights = [1.28, math.exp(-0.1), math.exp(-1.0)]
    expected = -sum(w * 2.0 * lp for w, lp in zip(weights, [-1.0, -2.0, -3.0])) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    out.loss.backward()
    # The weight is a constant: d loss / d logp_t = -w_t * A / tokens, a clipped token keeps its gradient.
    assert logp.grad[0].tolist() == pytest.approx([-w * 2.0 / 3 for w in weights], rel=1e-5)


def test_cispo_matches_the_published_objective_and_gradient():
    logp, old_logp, advantages, mask = _batch()
    out = cispo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28)
    out.loss.backward()
    total, grads = 0.0, torch.zeros_like(logp)
    tokens = int(mask.sum())
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                r = math.exp(logp[i, t].item() - old_logp[i, t].item())
                r_hat = min(max(r, 0.8), 1.28)  # sg(clip(r, 1 - eps_low, 1 + eps_high))
                total += -r_hat * advantages[i].item() * logp[i, t].item()
                grads[i, t] = -r_hat * advantages[i].item() / tokens
    assert out.loss.item() == pytest.approx(total / tokens, rel=1e-5)
    torch.testing.assert_close(logp.grad, grads, rtol=1e-5, atol=1e-7)


def test_cispo_equals_ppo_clip_on_policy():
    logp, _, advantages, mask = _batch(1)
    cispo = cispo_policy_loss(logp, logp.detach(), advantages, mask, 0.2, 0.2)
    (cispo_grad,) = torch.autograd.grad(cispo.loss, logp)
    ppo = ppo_clip_policy_loss(logp, logp.detach(), advantages, mask, 0.2, 0.2)
    (ppo_grad,) = torch.autograd.grad(ppo.loss, logp)
    torch.testing.assert_close(cispo_grad, ppo_grad)


def _gmpo_transcription(logp, old_logp, advantages, mask, low, high):
    """GMPO (arXiv 2507.20673) eq. 3 as written per response, the clip sign-aware in log space (verl geo_mean)."""
    losses = []
    for i in range(logp.shape[0]):
        a = advantages[i].item()
        terms = []
        for t in range(logp.shape[1]):
            if mask[i, t]:
                x = logp[i, t] - old_logp[i, t]
                bounded = x.clamp(-low, high)
                terms.append(torch.minimum(x, bounded) if a > 0 else torch.maximum(x, bounded) if a < 0 else x)
        losses.append(-a * torch.exp(torch.stack(terms).mean()))
    return torch.stack(losses).mean()


def test_gmpo_matches_the_published_objective_and_gradient():
    logp, old_logp, advantages, mask = _batch(2)
    out = gmpo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.4, clip_high=0.4)
    (grad,) = torch.autograd.grad(out.loss, logp)
    reference = _gmpo_transcription(logp, old_logp, advantages, mask, 0.4, 0.4)
    (reference_grad,) = torch.autograd.grad(reference, logp)
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-7)


def test_gmpo_by_hand():
    # A = 1: log-ratios 0.6 (clipped to 0.4: no gradient), -0.6 (A > 0 leaves the low side) -> exp((0.4 - 0.6) / 2)
    logp = torch.tensor([[0.6, -0.6]], requires_grad=True)
    out = gmpo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                           0.4, 0.4)
    assert out.loss.item() == pytest.approx(-math.exp(-0.1))
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, -math.exp(-0.1) / 2])
    assert out.clip_fraction.item() == pytest.approx(0.5)


def test_rollout_correction_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rollout = torch.tensor([[-1.0, 0.5, 0.0], [-0.2, -0.2, 0.0]])  # log rho = old - rollout
    mask = torch.tensor([[True, True, True], [True, True, False]])
    token = rollout_correction_weights(old, rollout, mask, "token", 2.0, None, 0.5, 2.0)
    assert token.weights.flatten().tolist() == pytest.approx([2.0, math.exp(-0.5), 1.0, *[math.exp(0.2)] * 2, 0.0])
    assert token.truncated.tolist() == [[True, False, False], [False, False, False]]
    sequence = rollout_correction_weights(old, rollout, mask, "sequence", 2.0, None, 0.5, 2.0)
    assert sequence.weights[0].tolist() == pytest.approx([math.exp(0.5)] * 3)  # prod rho = e^(1 - 0.5)
    assert sequence.weights[1].tolist() == pytest.approx([math.exp(0.4)] * 2 + [0.0])
    # Token RS at [0.5, 2]: e^1 = 2.7 is rejected; sequence RS: e^0.5 and e^0.4 pass; geometric likewise.
    rs = rollout_correction_weights(old, rollout, mask, None, 2.0, "token", 0.5, 2.0)
    assert rs.keep.tolist() == [[False, True, True], [True, True, False]]
    assert rs.weights.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    rs_seq = rollout_correction_weights(old, rollout, mask, None, 2.0, "sequence", 0.5, 1.5)
    assert rs_seq.keep.tolist() == [[False] * 3, [True, True, False]]  # e^0.5 = 1.65 > 1.5, e^0.4 = 1.49
    rs_geo = rollout_correction_weights(old, rollout, mask, None, 2.0, "geometric", 0.5, 1.2)
    assert rs_geo.keep.tolist() == [[True] * 3, [False, False, False]]  # e^(0.5 / 3) = 1.18, e^0.2 = 1.22


def test_rollout_correction_matches_verl_style_transcription():
    generator = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 9, generator=generator) * 2
    rollout = old + 0.8 * torch.randn(6, 9, generator=generator)
    mask = torch.rand(6, 9, generator=generator) > 0.2
    out = rollout_correction_weights(old, rollout, mask, "token", 1.5, "token", 0.4, 3.0)
    for i in range(6):
        for t in range(9):
            rho = math.exp(old[i, t].item() - rollout[i, t].item())
            kept = bool(mask[i, t]) and 0.4 <= rho <= 3.0
            assert bool(out.keep[i, t]) == kept
            assert out.weights[i, t].item() == pytest.approx(min(rho, 1.5) if kept else 0.0, rel=1e-5)
    sums = mismatch_sums(old, rollout, mask, out)
    metrics = mismatch_metrics(sums)
    diffs = [old[i, t].item() - rollout[i, t].item() for i in range(6) for t in range(9) if mask[i, t]]
    assert metrics["rollout_correction/abs_log_ratio"] == pytest.approx(sum(abs(d) for d in diffs) / len(diffs))
    assert metrics["rollout_correction/kl_rollout_old_k1"] == pytest.approx(-sum(diffs) / len(diffs))
    k3 = sum(math.exp(d) - d - 1 for d in diffs) / len(diffs)
    assert metrics["rollout_correction/kl_rollout_old_k3"] == pytest.approx(k3)
    truncated = sum(math.exp(d) > 1.5 for d in diffs) / len(diffs)
    rejected = sum(not 0.4 <= math.exp(d) <= 3.0 for d in diffs) / len(diffs)
    assert metrics["rollout_correction/truncated_token_fraction"] == pytest.approx(truncated)
    assert metrics["rollout_correction/rejected_token_fraction"] == pytest.approx(rejected)


def test_is_weights_are_constants_multiplied_into_the_token_losses():
    logp, old_logp, advantages, mask = _batch(4)
    weights = torch.rand(logp.shape, generator=torch.Generator().manual_seed(5)) * 2
    weighted = ppo_clip_policy_loss(logp, old_logp, advantages, mask, 0.2, 0.2, is_weights=weights.requires_grad_())
    plain = ppo_clip_policy_loss(logp, old_logp, advantages, mask, 0.2, 0.2, aggregation="token-mean")
    ratio = torch.exp(logp - old_logp)
    token = torch.maximum(-advantages[:, None] * ratio, -advantages[:, None] * ratio.clamp(0.8, 1.2))
    assert weighted.loss.item() == pytest.approx(((token * weights)[mask].sum() / mask.sum()).item(), rel=1e-5)
    assert plain.loss.item() != pytest.approx(weighted.loss.item())
    weighted.loss.backward()
    assert weights.grad is None  # detached


def test_overlong_penalty_by_hand_and_published_formula():
    lengths = torch.tensor([10, 16, 17, 18, 20])
    # L_max = 20, L_cache = 4: 0 up to 16 tokens, then -(|y| - 16) / 4, times the penalty factor 0.5
    assert overlong_penalty(lengths, 20, 4, 0.5).tolist() == pytest.approx([0.0, 0.0, -0.125, -0.25, -0.5])
    for length in range(0, 21):
        published = 0.0 if length <= 16 else ((20 - 4) - length) / 4  # DAPO eq. 13 (|y| <= L_max here)
        assert overlong_penalty(torch.tensor([length]), 20, 4, 1.0).item() == pytest.approx(published)
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(lengths, 20, 0, 1.0)


def test_groups_with_spread():
    metric = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.3, 0.7, 0.3], [2.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, False, True], [True, False, False]])
    # all equal; spread; equal on its valid members; a single valid member (no baseline)
    assert groups_with_spread(metric, valid).tolist() == [False, True, False, False]


@pytest.mark.parametrize("override, message", [
    ("policy.rollout_correction.is_level=tokens", "policy.rollout_correction.is_level='tokens' is not one of"),
    ("policy.rollout_correction.rs=seq", "policy.rollout_correction.rs='seq' is not one of"),
    ("policy.rollout_correction.rs_low=1.5", "rs_low=1.5 <= 1"),
    ("rollout.dynamic_sampling.metric=verifier", "reward.verifier .* is needed"),
    ("reward.overlong_buffer.length=13", "reward.overlong_buffer.length=13 must be in"),
    ("policy.loss=cispo_v2", "policy.loss='cispo_v2' is not one of ppo_clip, gspo, cispo, gmpo"),
])
def test_bad_issue_39_settings_are_refused_by_name(override, message):
    from megatron_save.config import load_config
    from megatron_save.trainers.stage3.config import Stage3Config, check_stage3_config

    extra = ["rollout.dynamic_sampling.enabled=true"] if "dynamic_sampling" in override else []
    cfg = load_config(Stage3Config, CPU_CONFIG, [override, *extra])
    with pytest.raises(ValueError, match=message):
        check_stage3_config(cfg)


def test_megatron_rollouts_refuse_rollout_correction_with_top_p_only():
    from megatron_save.config import load_config
    from megatron_save.trainers.stage3.config import Stage3Config, check_stage3_config

    settings = ["rollout.backend=megatron", "policy.rollout_correction.log_mismatch=true"]
    check_stage3_config(load_config(Stage3Config, CPU_CONFIG, [*settings, "rollout.sampling.top_k=5"]))
    cfg = load_config(Stage3Config, CPU_CONFIG, [*settings, "rollout.sampling.top_p=0.9"])
    with pytest.raises(ValueError, match=r"rollout.backend=megatron reports them with temperature and top_k, not "
                                         r"top_p \(rollout.sampling.top_p=0.9\)"):
        check_stage3_config(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["policy.loss=cispo", "policy.dual_clip=3.0"], r"policy.dual_clip=3.0 applies to policy.loss=ppo_clip only"),
    (["memory_check.margin_gib=-1"], r"memory_check.margin_gib=-1.0 must be >= 0"),
])
def test_settings_that_would_be_ignored_or_fail_late_are_refused_first(overrides, message):
    from megatron_save.config import load_config
    from megatron_save.trainers.stage3.config import Stage3Config, check_stage3_config

    with pytest.raises(ValueError, match=message):
        check_stage3_config(load_config(Stage3Config, CPU_CONFIG, overrides))
