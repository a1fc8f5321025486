"""Critic-free advantage estimators over groups of responses (GRPO, Dr.GRPO, RLOO, REINFORCE++).

Scores come as padded groups ``[B, G]`` with ``valid`` [B, G] marking real (kept) responses. Advantages of
invalid slots are 0. A group with a single valid response has no baseline to compare with, so its advantage is
0 (verl instead keeps such a response's raw score).
"""

from __future__ import annotations

import torch


def _group_stats(scores: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group: count [B, 1], mean [B, 1], unbiased variance [B, 1] over valid members."""
    count = valid.sum(dim=1, keepdim=True)  # [B, 1]
    values = scores.float().masked_fill(~valid, 0.0)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    squares = ((values - mean) ** 2).masked_fill(~valid, 0.0).sum(dim=1, keepdim=True)
    return count, mean, squares / (count - 1).clamp(min=1)


def grpo_advantages(
    scores: torch.Tensor, valid: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: (s - group mean) / (unbiased group std + eps); Dr.GRPO with ``norm_by_std=False``: s - group mean.

    scores [B, G], valid [B, G] bool -> advantages [B, G].
    """
    count, mean, variance = _group_stats(scores, valid)
    advantages = scores.float() - mean
    if norm_by_std:
        advantages = advantages / (variance.sqrt() + eps)
    return advantages.masked_fill(~valid | (count < 2), 0.0)


def rloo_advantages(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RLOO: s_i minus the mean of the other valid members of its group = n / (n - 1) * (s_i - group mean).

    scores [B, G], valid [B, G] bool -> advantages [B, G].
    """
    count, mean, _ = _group_stats(scores, valid)
    advantages = (scores.float() - mean) * count / (count - 1).clamp(min=1)
    return advantages.masked_fill(~valid | (count < 2), 0.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance); 0 elsewhere."""
    count = mask.sum()
    mean = values.masked_fill(~mask, 0.0).sum() / count.clamp(min=1)
    variance = ((values - mean) ** 2).masked_fill(~mask, 0.0).sum() / (count - 1).clamp(min=1)
    return ((values - mean) * torch.rsqrt(variance + eps)).masked_fill(~mask, 0.0)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} along each response. token_rewards, mask [N, T] -> returns [N, T]."""
    rewards = token_rewards.float().masked_fill(~mask, 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):  # a loop over time, not over prompts: T steps of [N] ops
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns.masked_fill(~mask, 0.0)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++: discounted returns of per-token rewards (outcome reward on the last token, optionally a KL
    penalty on every token), whitened over all response tokens of the batch. [N, T] -> [N, T]."""
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask, eps)


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor, valid: torch.Tensor, token_mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++ with a group baseline: (s - group mean) on every token of the response, whitened over all
    response tokens of the batch. scores, valid [B, G], token_mask [B, G, T] -> [B, G, T]."""
    count, mean, _ = _group_stats(scores, valid)
    centred = (scores.float() - mean).masked_fill(~valid | (count < 2), 0.0)  # [B, G]
    mask = token_mask & valid[..., None]
    return masked_whiten(centred[..., None].expand_as(token_mask), mask, eps)


ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def token_advantages(kind: str, rewards: torch.Tensor, kept: torch.Tensor, response_lengths: torch.Tensor
                     ) -> torch.Tensor:
    """Advantages of every response token by estimator ``kind`` (one of ADVANTAGE_ESTIMATORS).

    rewards, kept [B, G], response_lengths [B, G] -> [B, G, T] (T the longest response; outcome advantages are
    constant along a response, REINFORCE++ puts the outcome reward on the last token and whitens over the batch).
    """
    rewards = rewards.float().nan_to_num(0.0)
    steps = torch.arange(int(response_lengths.max().clamp(min=1)))
    token_mask = (steps < response_lengths[..., None]) & kept[..., None]  # [B, G, T]
    if kind in ("grpo", "dr_grpo", "rloo"):
        per_response = (rloo_advantages(rewards, kept) if kind == "rloo"
                        else grpo_advantages(rewards, kept, norm_by_std=kind == "grpo"))  # [B, G]
        return per_response[..., None] * token_mask
    if kind == "reinforce_pp_baseline":
        return reinforce_pp_baseline_advantages(rewards, kept, token_mask)
    if kind == "reinforce_pp":
        last = (steps == (response_lengths[..., None] - 1)) & token_mask  # outcome reward on the last token
        flat = token_mask.flatten(0, 1)
        return reinforce_pp_advantages((rewards[..., None] * last).flatten(0, 1), flat).view_as(token_mask)
    raise ValueError(f"unknown advantage estimator {kind!r}; one of {', '.join(ADVANTAGE_ESTIMATORS)}")
