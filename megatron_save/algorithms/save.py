"""SAVE's curriculum filter, value-anchored partition and losses (paper eqs. 13-21), batched over groups.

Responses come as padded groups: ``rewards`` [B, G] with ``valid`` [B, G] marking real responses (groups may be
ragged or have filtered-out members), ``values`` [B] the value anchor V(x) of each prompt.
"""

from __future__ import annotations

import torch


def curriculum_threshold(step: int, total_steps: int, initial_margin: float) -> float:
    """mu(t) of eq. 14: p(t) = min(1 - m0 + t / T, 1), mu(t) = (2 - p(t)) / 2.

    mu falls from (1 + m0) / 2 at t = 0 to 1/2 at t >= m0 * T; sigmoid(|a|) >= 1/2 always, so the filter
    then keeps every response.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= initial_margin <= 1.0:
        raise ValueError(f"initial_margin must be in [0, 1], got {initial_margin}")
    progress = min(1.0 - initial_margin + step / total_steps, 1.0)
    return (2.0 - progress) / 2.0


def save_partition(
    rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eqs. 13, 15-17: keep y iff sigmoid(|R - V|) >= mu, split kept by the sign of R - V.

    rewards [B, G], values [B], valid [B, G] bool, threshold mu(t) ->
    pos_mask [B, G] (kept, a >= 0), neg_mask [B, G] (kept, a < 0), prompt_keep [B] (both sets non-empty).
    Non-finite rewards or values are never kept.
    """
    advantages = rewards.float() - values.float()[:, None]  # [B, G]
    kept = valid & torch.isfinite(advantages) & (torch.sigmoid(advantages.abs()) >= threshold)  # [B, G]
    pos_mask = kept & (advantages >= 0)
    neg_mask = kept & (advantages < 0)
    prompt_keep = pos_mask.any(dim=1) & neg_mask.any(dim=1)  # [B]
    return pos_mask, neg_mask, prompt_keep


def save_reward_loss(
    rewards: torch.Tensor,
    values: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    prompt_keep: torch.Tensor,
) -> torch.Tensor:
    """Eqs. 18-20: softmax value-anchored contrastive loss, mean over kept prompts; V is stop-gradient.

    L+_i = -mean_{y in Y+} log( e^R(y) / (e^SG[V] + sum_{y' in Y+} e^R(y')) ) = lse(SG[V], R(Y+)) - mean_{Y+} R
    L-_i = -log( e^SG[V] / (e^SG[V] + sum_{y in Y-} e^R(y)) )               = lse(SG[V], R(Y-)) - SG[V]
    rewards [B, G], values [B], pos_mask / neg_mask [B, G] bool, prompt_keep [B] bool -> scalar.
    Zero, with zero gradient everywhere, when no prompt is kept. Log-sum-exps keep it stable at any scale.
    """
    # Prompts with a non-finite anchor are never kept (save_partition); zero it so that no NaN reaches backward.
    anchor = values.detach().float().nan_to_num(0.0, 0.0, 0.0)[:, None]  # [B, 1]
    # Unused slots may hold anything (padding, NaN); replace them before any arithmetic.
    rewards = rewards.float().masked_fill(~(pos_mask | neg_mask), 0.0)  # [B, G]
    log_norm_pos = torch.logsumexp(torch.cat([anchor, rewards.masked_fill(~pos_mask, float("-inf"))], 1), 1)  # [B]
    log_norm_neg = torch.logsumexp(torch.cat([anchor, rewards.masked_fill(~neg_mask, float("-inf"))], 1), 1)  # [B]
    mean_pos_reward = (rewards * pos_mask).sum(dim=1) / pos_mask.sum(dim=1).clamp(min=1)  # [B]
    per_prompt = (log_norm_pos - mean_pos_reward) + (log_norm_neg - anchor[:, 0])  # [B]
    return per_prompt.masked_fill(~prompt_keep, 0.0).sum() / prompt_keep.sum().clamp(min=1)


def value_anchor_loss(values: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 21 (and eq. 12 in stage 2): mean over prompts of (V(x) - mean_y SG[R(x, y)])^2.

    values [B], rewards [B, G], valid [B, G] bool -> scalar. Prompts without a valid response are left out.
    Only ``values`` receives gradient; compute V on a detached backbone state so only the value head learns.
    """
    rewards = rewards.detach().float().masked_fill(~valid, 0.0)  # [B, G]
    counts = valid.sum(dim=1)  # [B]
    targets = rewards.sum(dim=1) / counts.clamp(min=1)  # [B]
    has_responses = counts > 0
    squared = (values.float() - targets).square().masked_fill(~has_responses, 0.0)  # [B]
    return squared.sum() / has_responses.sum().clamp(min=1)
