"""Reward-model updates of the paper's baselines, as pure tensor functions over padded groups [B, G]."""

from __future__ import annotations

import torch

from megatron_save.algorithms.bradley_terry import bt_loss


def mean_reward_anchor(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The "Mean Reward" baseline's anchor: each group's mean reward (stop-gradient) in place of V(x).

    rewards [B, G], valid [B, G] bool -> [B] (0 for a group without a valid response).
    """
    values = rewards.detach().float().masked_fill(~valid, 0.0)
    return values.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def highest_lowest_pairs(rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HL-BT's pairs: in each group the highest- and the lowest-reward valid response.

    rewards [B, G], valid [B, G] -> (best [B] index, worst [B] index, has_pair [B]: two valid responses with
    different rewards; a group whose responses all tie gives no preference).
    """
    scores = rewards.detach().float()
    best = scores.masked_fill(~valid, float("-inf")).argmax(dim=1)
    worst = scores.masked_fill(~valid, float("inf")).argmin(dim=1)
    rows = torch.arange(scores.shape[0], device=scores.device)
    has_pair = (valid.sum(dim=1) >= 2) & (scores[rows, best] > scores[rows, worst])
    return best, worst, has_pair


def hl_bt_loss(rewards: torch.Tensor, valid: torch.Tensor, grades: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry on the highest vs the lowest response of each group (mean over groups with a pair; zero with
    zero gradient when there is none), ranked by the rewards themselves (HL-BT) or by external ``grades`` (a
    verifier's: the pair is then labelled by the truth, not by the reward model).

    rewards [B, G], valid [B, G] bool, grades [B, G] or None -> scalar.
    """
    best, worst, has_pair = highest_lowest_pairs(rewards if grades is None else grades, valid)
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has_pair]
    if rows.numel() == 0:
        return (rewards.float().masked_fill(~valid, 0.0) * 0.0).sum()
    return bt_loss(rewards[rows, best[has_pair]], rewards[rows, worst[has_pair]])
