"""Policy-gradient losses (PPO-clip with dual clip and four aggregations, GSPO) and the KL penalty.

Token tensors are ``[N, T]`` (N responses, T response tokens) with ``mask`` [N, T] marking real tokens.
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
) -> PolicyLossOutput:
    """PPO's clipped surrogate per token, max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), with the dual clip
    min(., -A c) on negative advantages when ``dual_clip`` = c > 1, aggregated as asked.

    logp, old_logp, mask [N, T]; advantages [N, T], or [N] broadcast over tokens. ``norm_constant``: the constant
    of seq-mean-token-sum-norm (Dr.GRPO uses the generation budget; default T).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
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
    real = mask.sum().clamp(min=1)
    return PolicyLossOutput(
        loss=aggregate(token_losses, mask, aggregation, norm_constant),
        clip_fraction=(was_clipped & mask).sum() / real,
        approx_kl=(-log_ratio).masked_fill(~mask, 0.0).sum().detach() / real,
    )


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyLossOutput:
    """GSPO: sequence ratio s_i = exp(mean_t (logp - old_logp)) clipped at the sequence level,
    -mean_i min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i). Written per token as in GSPO-token
    (s_i,t = SG[s_i] * pi_t / SG[pi_t]) with the mean over sequences of token means: same value and gradient.

    logp, old_logp, mask [N, T]; advantages [N], or [N, T] reduced to each response's mean over its real tokens
    (positions outside ``mask``, such as a prompt's, may hold anything).
    """
    tokens = mask.sum(dim=1).clamp(min=1)  # [N]
    if advantages.dim() == 2:
        advantages = advantages.masked_fill(~mask, 0.0).sum(dim=1) / tokens  # [N]
    logp = logp.masked_fill(~mask, 0.0)  # padding may hold anything; keep it out of values and gradients
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)
    sequence_log_ratio = log_ratio.sum(dim=1) / tokens  # [N]
    token_log_ratio = sequence_log_ratio.detach()[:, None] + logp - logp.detach()  # [N, T]
    ratio = torch.exp(token_log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    advantage = advantages[:, None].expand_as(ratio)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_losses = torch.maximum(unclipped, clipped)
    sequence_ratio = sequence_log_ratio.detach().exp()
    sequence_clipped = (sequence_ratio < 1.0 - clip_low) & (advantages < 0) | (sequence_ratio > 1.0 + clip_high) & (advantages > 0)
    return PolicyLossOutput(
        loss=aggregate(token_losses, mask, "seq-mean-token-mean"),
        clip_fraction=sequence_clipped.float().mean(),
        approx_kl=(-log_ratio).sum().detach() / mask.sum().clamp(min=1),
    )


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
