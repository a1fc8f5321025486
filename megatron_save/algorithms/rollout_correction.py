"""Rollout correction: the trainer's old policy pi_old against the behaviour policy pi_rollout that the rollout
engine actually sampled from (other kernels, other precision). Truncated importance sampling (TIS) weights
min(pi_old / pi_rollout, threshold), rejection masks, and the mismatch measures.

Token tensors are ``[N, T]`` with ``mask`` [N, T] marking real response tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Log-ratios are clamped here before exp (verl's SAFETY_BOUND): a far-off token gives a large, finite weight.
MAX_LOG_RATIO = 20.0
IS_LEVELS = ("token", "sequence")
RS_LEVELS = ("token", "sequence", "geometric")


@dataclass
class RolloutCorrection:
    """What rollout correction does to a batch."""

    weights: torch.Tensor
    """[N, T] fp32 IS weights multiplied into each token's loss (1 without IS; 0 off ``keep``)."""
    keep: torch.Tensor
    """[N, T] bool, the real tokens rejection sampling keeps (``mask`` without RS)."""
    truncated: torch.Tensor
    """[N, T] bool, real tokens whose IS weight was cut to the threshold (for sequence IS: every token of a
    truncated sequence)."""


def rollout_correction_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                               is_level: str | None, is_threshold: float, rs_level: str | None, rs_low: float,
                               rs_high: float) -> RolloutCorrection:
    """IS weights and rejection mask from log rho_t = old_logp - rollout_logp. [N, T] -> RolloutCorrection.

    IS ``is_level``: token: w_t = min(rho_t, is_threshold); sequence: w = min(prod_t rho_t, is_threshold) on every
    token of the response; None: w = 1. RS ``rs_level`` rejects what falls outside [rs_low, rs_high]: token: each
    rho_t; sequence: prod_t rho_t (the whole response); geometric: exp(mean_t log rho_t) (the whole response);
    None rejects nothing. Rejected tokens get weight 0 and leave ``keep``.
    """
    log_rho = (old_logp - rollout_logp).float().masked_fill(~mask, 0.0)  # [N, T]
    tokens = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [N, 1]
    sequence_log_rho = log_rho.sum(dim=1, keepdim=True)  # [N, 1]
    if is_level is None:
        raw = torch.ones_like(log_rho)
    elif is_level == "token":
        raw = torch.exp(log_rho.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    elif is_level == "sequence":
        raw = torch.exp(sequence_log_rho.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)).expand_as(log_rho)
    else:
        raise ValueError(f"rollout correction is={is_level!r} is not one of {IS_LEVELS} or null")
    truncated = (raw > is_threshold) & mask if is_level is not None else torch.zeros_like(mask)
    weights = raw.clamp(max=is_threshold) if is_level is not None else raw
    if rs_level is None:
        keep = mask.clone()
    else:
        if rs_level == "token":
            statistic = log_rho
        elif rs_level == "sequence":
            statistic = sequence_log_rho.expand_as(log_rho)
        elif rs_level == "geometric":
            statistic = (sequence_log_rho / tokens).expand_as(log_rho)
        else:
            raise ValueError(f"rollout correction rs={rs_level!r} is not one of {RS_LEVELS} or null")
        # Compared in log space: the sequence product of a long response overflows where its log does not.
        inside = (statistic >= math.log(rs_low)) & (statistic <= math.log(rs_high))
        keep = mask & inside
    return RolloutCorrection(weights.masked_fill(~keep, 0.0), keep, truncated)


MISMATCH_SUMS = ("abs_log_ratio", "kl_k1", "kl_k3", "tokens", "truncated_tokens", "rejected_tokens",
                 "sequences", "truncated_sequences", "rejected_sequences")


def mismatch_sums(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                  correction: RolloutCorrection) -> torch.Tensor:
    """[len(MISMATCH_SUMS)] fp64 sums over the real tokens (and responses) of a batch, to be added over ranks and
    divided by their counts: |log pi_old - log pi_rollout|; KL(pi_rollout || pi_old) by k1 (log pi_rollout -
    log pi_old) and k3 (rho - log rho - 1, rho = pi_old / pi_rollout), both unbiased on samples of pi_rollout;
    tokens; truncated and rejected tokens; responses; responses with a truncated, and with a rejected, token."""
    log_rho = (old_logp - rollout_logp).double().masked_fill(~mask, 0.0)  # [N, T]
    k3 = torch.exp(log_rho.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)) - log_rho - 1.0
    real = mask.any(dim=1)  # [N]
    rejected = mask & ~correction.keep
    return torch.stack([
        log_rho.abs().sum(), (-log_rho).sum(), k3.masked_fill(~mask, 0.0).sum(), mask.sum().double(),
        correction.truncated.sum().double(), rejected.sum().double(), real.sum().double(),
        correction.truncated.any(dim=1).sum().double(), rejected.any(dim=1).sum().double()])


def mismatch_metrics(sums: torch.Tensor) -> dict[str, float]:
    """MISMATCH_SUMS (added over ranks) -> means and shares, named rollout_correction/*."""
    values = dict(zip(MISMATCH_SUMS, sums.tolist()))
    tokens, sequences = max(values["tokens"], 1.0), max(values["sequences"], 1.0)
    return {f"rollout_correction/{name}": value for name, value in {
        "abs_log_ratio": values["abs_log_ratio"] / tokens,
        "kl_rollout_old_k1": values["kl_k1"] / tokens,
        "kl_rollout_old_k3": values["kl_k3"] / tokens,
        "truncated_token_fraction": values["truncated_tokens"] / tokens,
        "rejected_token_fraction": values["rejected_tokens"] / tokens,
        "truncated_sequence_fraction": values["truncated_sequences"] / sequences,
        "rejected_sequence_fraction": values["rejected_sequences"] / sequences,
    }.items()}
