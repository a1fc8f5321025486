"""Policy-gradient losses (PPO-clip with dual clip and four aggregations, GSPO, CISPO, GMPO) and the KL penalty.

Token tensors are ``[N, T]`` (N responses, T response tokens) with ``mask`` [N, T] marking real tokens. Every loss
takes optional ``is_weights`` [N, T]: rollout-correction weights (``rollout_correction_weights``), constants that
multiply each token's loss before aggregation (verl's ``rollout_is_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Log-ratios are clamped here before exp (as verl does): a far off-policy token gives a large, finite loss.
MAX_LOG_RATIO = 20.0
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")


@dataclass
class PolicyLossOutput:
    """A policy loss and what to log about it."""

    loss: torch.Tensor
    """Scalar to minimise."""
    clip_fraction: torch.Tensor
    """Share of real tokens (or sequences, for GSPO) whose ratio was clipped."""
    approx_kl: torch.Tensor
    """Mean of old_logp - logp over real tokens (how far the policy moved)."""


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, aggregation: str, norm_constant: float | None = None
              ) -> torch.Tensor:
    """[N, T] -> scalar. token-mean: over all real tokens; seq-mean-token-sum: mean over responses of their sums;
    seq-mean-token-mean: mean over responses of their means; seq-mean-token-sum-norm (Dr.GRPO): sum over all real
    tokens divided by a constant (``norm_constant``, default T) and by N."""
    values = token_losses.masked_fill(~mask, 0.0)
    per_sequence_tokens = mask.sum(dim=1)  # [N]
    if aggregation == "token-mean":
        return values.sum() / mask.sum().clamp(min=1)
    if aggregation == "seq-mean-token-sum":
        return values.sum(dim=1).mean()
    if aggregation == "seq-mean-token-mean":
        return (values.sum(dim=1) / per_sequence_tokens.clamp(min=1)).mean()
    if aggregation == "seq-mean-token-sum-norm":
        return values.sum(dim=1).mean() / (norm_constant or mask.shape[1])
    raise ValueError(f"aggregation {aggregation!r} is not one of {AGGREGATIONS}")


def ppo_clip_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    norm_constant: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO's clipped surrogate per token, max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), with the dual clip
    min(., -A c) on negative advantages when ``dual_clip`` = c > 1, aggregated as asked.

    logp, old_logp, mask [N, T]; advantages [N, T], or [N] broadcast over tokens. ``norm_constant``: the constant
    of seq-mean-token-sum-norm (Dr.GRPO uses the generation budget; default T).
    """
    advantages = _per_token(advantages, logp)  # [N, T]
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [N, T]
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_losses = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = torch.minimum(token_losses, -advantages * dual_clip)
        token_losses = torch.where(advantages < 0, capped, token_losses)
    token_losses = _weighted(token_losses, is_weights)
    real = mask.sum().clamp(min=1)
    return PolicyLossOutput(
        loss=aggregate(token_losses, mask, aggregation, norm_constant),
        clip_fraction=(was_clipped & mask).sum() / real,
        approx_kl=_approx_kl(log_ratio, mask),
    )


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """GSPO: sequence ratio s_i = exp(mean_t (logp - old_logp)) clipped at the sequence level,
    -mean_i min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i). Written per token as in GSPO-token
    (s_i,t = SG[s_i] * pi_t / SG[pi_t]) with the mean over sequences of token means: same value and gradient.

    logp, old_logp, mask [N, T]; advantages [N], or [N, T] reduced to each response's mean over its real tokens
    (positions outside ``mask``, such as a prompt's, may hold anything).
    """
    tokens = mask.sum(dim=1).clamp(min=1)  # [N]
    advantages = _per_sequence(advantages, mask)  # [N]
    logp = logp.masked_fill(~mask, 0.0)  # padding may hold anything; keep it out of values and gradients
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)
    sequence_log_ratio = log_ratio.sum(dim=1) / tokens  # [N]
    token_log_ratio = sequence_log_ratio.detach()[:, None] + logp - logp.detach()  # [N, T]
    ratio = torch.exp(token_log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    advantage = advantages[:, None].expand_as(ratio)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_losses = _weighted(torch.maximum(unclipped, clipped), is_weights)
    sequence_ratio = sequence_log_ratio.detach().exp()
    sequence_clipped = (sequence_ratio < 1.0 - clip_low) & (advantages < 0) | (sequence_ratio > 1.0 + clip_high) & (advantages > 0)
    return PolicyLossOutput(
        loss=aggregate(token_losses, mask, "seq-mean-token-mean"),
        clip_fraction=sequence_clipped.float().mean(),
        approx_kl=_approx_kl(log_ratio, mask),
    )


def cispo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    aggregation: str = "token-mean",
    norm_constant: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, eqs. 4-5): per token -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp, with
    r = exp(logp - old_logp). The clipped IS weight is a constant (stop-gradient), so a clipped token keeps its
    gradient A * grad(logp) scaled by the bound, where PPO-clip's would be zero.

    logp, old_logp, mask [N, T]; advantages [N, T], or [N] broadcast over tokens; aggregated as asked.
    """
    advantages = _per_token(advantages, logp)  # [N, T]
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)
    ratio = torch.exp(log_ratio.detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [N, T]
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_losses = _weighted(-clipped_ratio * advantages * logp.masked_fill(~mask, 0.0), is_weights)
    real = mask.sum().clamp(min=1)
    return PolicyLossOutput(
        loss=aggregate(token_losses, mask, aggregation, norm_constant),
        clip_fraction=((clipped_ratio != ratio) & mask).sum() / real,
        approx_kl=_approx_kl(log_ratio, mask),
    )


def gmpo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """GMPO: per response -A_i * prod_t (r_t^clipped)^(1 / |y_i|) = -A_i * exp(mean_t l_t), averaged over
    responses, where l_t = logp - old_logp is clipped sign-aware in log space: for A > 0, min(l, clip(l, -clip_low,
    clip_high)); for A < 0, max(l, clip(l, ...)) (GMPO paper eq. 3; its range (e^-0.4, e^0.4) is clip_low =
    clip_high = 0.4 here). A clipped token is a constant in the mean, so its gradient is zero.

    logp, old_logp, mask [N, T]; advantages [N], or [N, T] reduced to each response's mean over its real tokens.
    ``is_weights`` [N, T] enter as each response's geometric mean of its tokens' weights (as verl does).
    """
    tokens = mask.sum(dim=1).clamp(min=1)  # [N]
    advantages = _per_sequence(advantages, mask)  # [N]
    logp = logp.masked_fill(~mask, 0.0)
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)  # [N, T]
    sign = torch.sign(advantages)[:, None]  # [N, 1]
    bounded = log_ratio.clamp(-clip_low, clip_high)
    clipped = sign * torch.minimum(sign * log_ratio, sign * bounded)  # [N, T]
    sequence_log_ratio = clipped.masked_fill(~mask, 0.0).sum(dim=1) / tokens  # [N]
    sequence_losses = -advantages * torch.exp(sequence_log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [N]
    if is_weights is not None:
        log_weights = torch.log(is_weights.clamp(min=1e-10)).masked_fill(~mask, 0.0)
        sequence_losses = sequence_losses * torch.exp(log_weights.sum(dim=1) / tokens)
    real = mask.sum().clamp(min=1)
    was_clipped = (bounded != log_ratio) & mask & (sign != 0) & (clipped == bounded)
    return PolicyLossOutput(
        loss=sequence_losses.mean(),
        clip_fraction=was_clipped.sum() / real,
        approx_kl=_approx_kl(log_ratio, mask),
    )


def _per_token(advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Advantages [N] broadcast over each response's tokens, or [N, T] as they are -> [N, T]."""
    return advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages


def _per_sequence(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages [N, T] reduced to each response's mean over its real tokens, or [N] as they are -> [N]."""
    if advantages.dim() == 1:
        return advantages
    return advantages.masked_fill(~mask, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _approx_kl(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi_old || pi) estimated on the real tokens (k1: the mean of -log r), for logging. [N, T] -> []."""
    return (-log_ratio).masked_fill(~mask, 0.0).sum().detach() / mask.sum().clamp(min=1)


def _weighted(token_losses: torch.Tensor, is_weights: torch.Tensor | None) -> torch.Tensor:
    """Token losses times the rollout-correction weights (constants: no gradient flows into them)."""
    return token_losses if is_weights is None else token_losses * is_weights.detach()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3). [N, T] -> [N, T].

    k1 = logp - ref_logp; k2 = (logp - ref_logp)^2 / 2; k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1,
    with the log-ratio clamped to +-20 and k3 to [-10, 10], as verl's low-variance KL. Aggregate with the policy loss's mask and aggregation.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        # Clamping the log-ratio before exp keeps the gradient finite too (clamping only the result would not).
        ref_over_pi = (-log_ratio).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        return (ref_over_pi.exp() - ref_over_pi - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"KL kind {kind!r} is not one of {KL_KINDS}")
