"""The paper's equations as pure tensor functions (no configs, no globals); shapes in comments."""

from megatron_save.algorithms.bradley_terry import bt_loss, pairwise_accuracy
from megatron_save.algorithms.save import (
    curriculum_threshold,
    save_partition,
    save_reward_loss,
    value_anchor_loss,
)

__all__ = [
    "bt_loss",
    "curriculum_threshold",
    "pairwise_accuracy",
    "save_partition",
    "save_reward_loss",
    "value_anchor_loss",
]
