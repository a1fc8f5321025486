"""The paper's equations as pure tensor functions (no configs, no globals); shapes in comments."""

from megatron_save.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_advantages,
)
from megatron_save.algorithms.baselines import hl_bt_loss, highest_lowest_pairs, mean_reward_anchor
from megatron_save.algorithms.bradley_terry import bt_loss, pairwise_accuracy
from megatron_save.algorithms.dapo import groups_with_spread, overlong_penalty
from megatron_save.algorithms.policy_loss import (
    PolicyLossOutput,
    cispo_policy_loss,
    gmpo_policy_loss,
    gspo_policy_loss,
    kl_penalty,
    ppo_clip_policy_loss,
)
from megatron_save.algorithms.prime import (
    OUTCOME_LABEL_RULES,
    accuracy_filter,
    implicit_prm_loss,
    implicit_process_rewards,
    outcome_labels,
    prime_advantages,
)
from megatron_save.algorithms.r2m import grebt_loss, group_reward_entropy, r2m_time_weight
from megatron_save.algorithms.rollout_correction import (
    RolloutCorrection,
    mismatch_metrics,
    mismatch_sums,
    rollout_correction_weights,
)
from megatron_save.algorithms.save import (
    curriculum_threshold,
    save_partition,
    save_reward_loss,
    value_anchor_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "OUTCOME_LABEL_RULES",
    "accuracy_filter",
    "implicit_prm_loss",
    "implicit_process_rewards",
    "outcome_labels",
    "prime_advantages",
    "PolicyLossOutput",
    "RolloutCorrection",
    "bt_loss",
    "cispo_policy_loss",
    "gmpo_policy_loss",
    "groups_with_spread",
    "mismatch_metrics",
    "mismatch_sums",
    "overlong_penalty",
    "rollout_correction_weights",
    "grebt_loss",
    "group_reward_entropy",
    "grpo_advantages",
    "highest_lowest_pairs",
    "hl_bt_loss",
    "mean_reward_anchor",
    "gspo_policy_loss",
    "kl_penalty",
    "ppo_clip_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "token_advantages",
    "curriculum_threshold",
    "pairwise_accuracy",
    "r2m_time_weight",
    "save_partition",
    "save_reward_loss",
    "value_anchor_loss",
]
