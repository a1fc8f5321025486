"""R2M's time-step weighting and its GREBT loss (arXiv 2601.22664, eqs. 4-7), over padded groups [B, G]."""

from __future__ import annotations

import math

import torch

from megatron_save.algorithms.baselines import hl_bt_loss


def r2m_time_weight(step: int, total_steps: int, minimum: float) -> float:
    """omega(t) of eq. 4: max(cos(pi t / T) / 2 + 1/2, Omega), the weight of the RM's own last-token state; it
    falls from 1 at t = 0 to the floor Omega."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return max(0.5 * math.cos(math.pi * step / total_steps) + 0.5, minimum)


def group_reward_entropy(rewards: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 6 per group: entropy of softmax((r - mean) / std) over the group's valid responses (unbiased std,
    at least ``eps``).

    rewards, valid [B, G] -> [B]; 0 for a group with fewer than two valid responses.
    """
    rewards = rewards.float().masked_fill(~valid, 0.0)
    count = valid.sum(dim=1, keepdim=True)  # [B, 1]
    mean = rewards.sum(dim=1, keepdim=True) / count.clamp(min=1)
    variance = ((rewards - mean).square() * valid).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    # The clamp keeps sqrt's gradient finite when a group's rewards are all equal (or it has one response).
    standardized = ((rewards - mean) / variance.clamp(min=eps * eps).sqrt()).masked_fill(~valid, float("-inf"))
    log_p = torch.log_softmax(standardized, dim=1).masked_fill(~valid, 0.0)
    entropy = -(log_p.exp() * log_p).sum(dim=1)  # [B]
    return entropy.masked_fill(count[:, 0] < 2, 0.0)


def grebt_loss(rewards: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 7: (1 - alpha) x BT on each group's highest vs lowest reward (eq. 5) + alpha x the mean GRE over groups
    with at least two valid responses. rewards, valid [B, G] -> scalar."""
    groups = valid.sum(dim=1) >= 2  # [B]
    entropy = group_reward_entropy(rewards, valid).sum() / groups.sum().clamp(min=1)
    return (1.0 - alpha) * hl_bt_loss(rewards, valid) + alpha * entropy
