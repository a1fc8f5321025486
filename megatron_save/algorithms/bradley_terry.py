"""Bradley-Terry preference loss (paper eq. 2 / 11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(R(x, y_w) - R(x, y_l)) over pairs; finite for any reward gap.

    chosen_rewards, rejected_rewards: [N] -> scalar.
    """
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the chosen response scores strictly higher (a tie counts as wrong). [N] -> scalar."""
    return (chosen_rewards > rejected_rewards).float().mean()
