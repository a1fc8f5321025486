"""The rollout and scoring phases of a stage-3 step (Algorithm 2, lines 5-8): the step's prompts, G sampled
responses each, their rewards (from the reward model, or R2M's head), and the rollout log."""

from __future__ import annotations

import random
from pathlib import Path

from megatron_save.algorithms import r2m_time_weight
from megatron_save.data.batching import pad_id_of
from megatron_save.data.prompts import Prompt
from megatron_save.rollout.distributed import generate_data_parallel
from megatron_save.trainers.stage3.config import Stage3Config
from megatron_save.trainers.stage3.groups import (
    FeedbackPartition,
    GroupScores,
    RolloutGroups,
    prepare_groups,
    score_groups,
)
from megatron_save.trainers.stage3.metrics import PolicyUpdateInputs, append_rollout_log, passes
from megatron_save.trainers.stage3.prime import label_outcomes
from megatron_save.trainers.stage3.r2m import score_with_r2m
from megatron_save.trainers.stage3.run import Stage3Run
from megatron_save.trainers.stage3.verifier import verifier_grades
from megatron_save.trainers.strategies import RMStrategy

ROLLOUT_LOG = "rollouts.jsonl"


def prompt_batch(prompts: list[Prompt], batch_size: int, step: int, seed: int) -> list[Prompt]:
    """The prompts of ``step`` (1-based): epochs of a seeded shuffle cut into batches, a function of the step
    alone so that a resumed run continues the same sequence (an incomplete last batch of an epoch is dropped)."""
    per_epoch = len(prompts) // batch_size
    epoch, index = divmod(step - 1, per_epoch)
    order = list(range(len(prompts)))
    random.Random(seed + epoch).shuffle(order)
    return [prompts[i] for i in order[index * batch_size : (index + 1) * batch_size]]


def sample_groups(run: Stage3Run, cfg: Stage3Config, step: int) -> RolloutGroups:
    """Collective: the step's prompts, G sampled responses each, prepared for the policy and the reward model."""
    prompts = prompt_batch(run.prompts, cfg.prompts_per_step, step, cfg.seed)
    rollouts = generate_data_parallel(run.engine, [p.ids for p in prompts], cfg.rollout.sampling,
                                      seed=cfg.seed + 7919 * step)
    return prepare_groups(rollouts, prompts, run.policy_tokenizer, run.reward_tokenizer, cfg.reward.max_length,
                          cfg.rollout.drop_truncated)


def score_micro_batch(cfg: Stage3Config) -> int:
    """Sequences per scoring forward: reward.micro_batch_size prompts' worth of G responses."""
    return cfg.reward.micro_batch_size * cfg.rollout.sampling.n


def r2m_omega(cfg: Stage3Config, step: int) -> float:
    """R2M's weight on the reward model's own state at ``step`` (its eq. 5)."""
    return r2m_time_weight(step, cfg.total_steps, cfg.reward.r2m_min_weight)


def score_rollouts(run: Stage3Run, cfg: Stage3Config, groups: RolloutGroups, step: int) -> GroupScores | None:
    """Collective: R (and V) of the step's responses by the strategy's reward source (with PRIME's outcome labels
    for its strategy); None when that source has nothing to score."""
    if run.strategy.rewards == "verifier":  # the oracle: grades in [0, 1] as R, NaN on invalid slots, no V
        grades = verifier_grades(run.verifier, groups, run.policy_tokenizer)
        return GroupScores(grades.masked_fill(~groups.valid, float("nan")), None)
    if run.strategy.rewards == "r2m_head":
        return score_with_r2m(run.r2m_state, run.reward_model, run.policy, groups, r2m_omega(cfg, step),
                              pad_id_of(run.reward_tokenizer), pad_id_of(run.policy_tokenizer),
                              score_micro_batch(cfg))
    scores = score_groups(run.reward_model, groups, pad_id_of(run.reward_tokenizer), score_micro_batch(cfg))
    if run.strategy.implicit_prm:
        scores.outcome = label_outcomes(cfg.reward.prime, groups, scores.rewards, run.policy_tokenizer, run.verifier)
    return scores


def scoring_passes(strategy: RMStrategy) -> dict[str, float]:
    """The passes of one scoring by the strategy's reward source: the reward model, and for R2M the policy's
    hidden states and its head."""
    if strategy.rewards == "r2m_head":
        return passes("reward", forward=1) | passes("policy", forward=1) | passes("r2m_head", forward=1)
    if strategy.rewards == "verifier":
        return {}
    return passes("reward", forward=1)


def log_rollouts(run: Stage3Run, cfg: Stage3Config, step: int, groups: RolloutGroups, scores: GroupScores,
                 partition: FeedbackPartition, policy_update: PolicyUpdateInputs | None) -> None:
    """With ``rollout_log``: the step's rollouts, scores before any RM update, filter decisions, and what the
    policy update learned from (rank 0)."""
    if cfg.rollout_log:
        append_rollout_log(Path(cfg.output_dir) / ROLLOUT_LOG, step, groups, scores, partition, run.policy_tokenizer,
                           policy_update)
