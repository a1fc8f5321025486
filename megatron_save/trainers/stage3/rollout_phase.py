"""The rollout and scoring phases of a stage-3 step (Algorithm 2, lines 5-8): the step's prompts, G sampled
responses each, their rewards (from the reward model, or R2M's head), and the rollout log."""

from __future__ import annotations

import random
from pathlib import Path

from collections import Counter
from dataclasses import dataclass

import torch

from megatron_save.algorithms import groups_with_spread, overlong_penalty, r2m_time_weight
from megatron_save.data.batching import pad_id_of
from megatron_save.data.prompts import Prompt
from megatron_save.rollout.distributed import generate_data_parallel
from megatron_save.trainers.stage3.config import Stage3Config
from megatron_save.trainers.stage3.groups import (
    FeedbackPartition,
    GroupScores,
    RolloutGroups,
    concat_groups,
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
    return _generation_batch(run, cfg, step)


def _generation_batch(run: Stage3Run, cfg: Stage3Config, index: int) -> RolloutGroups:
    """Collective: prompt batch ``index`` (1-based; without dynamic sampling, the step's number) of the seeded
    prompt stream, G sampled responses each."""
    prompts = prompt_batch(run.prompts, cfg.prompts_per_step, index, cfg.seed)
    rollouts = generate_data_parallel(run.engine, [p.ids for p in prompts], cfg.rollout.sampling,
                                      seed=cfg.seed + 7919 * index)
    return prepare_groups(rollouts, prompts, run.policy_tokenizer, run.reward_tokenizer, cfg.reward.max_length,
                          cfg.rollout.drop_truncated)


EXTRA_BATCHES = "dynamic_sampling_extra_batches"
"""The run counter of generation batches beyond each step's first: it places every batch in the prompt stream, so
a resumed run (the counters are in its checkpoint) continues the same sequence."""


@dataclass
class DynamicSample:
    """A step's groups under DAPO's dynamic sampling."""

    groups: RolloutGroups
    """Every generated group, in generation order (the reward model's update sees them all)."""
    policy_groups: torch.Tensor
    """[B] bool, the groups the policy trains on: the first prompts_per_step with spread in the metric."""
    metric: torch.Tensor
    """[B, G] the metric the filter read (the policy's reward, or the verifier's grade)."""
    metrics: dict[str, float]
    """dynamic_sampling/* of the step (with the scoring's passes when the metric is the reward)."""
    scores: GroupScores | None
    """metric=reward: the scores of every group by the reward source as it stood before the step, which a strategy
    that does not score inside its update uses as the step's scores (not scored twice); None for metric=verifier."""


def sample_dynamic(run: Stage3Run, cfg: Stage3Config, step: int, counters: Counter) -> DynamicSample:
    """Collective: generation batches of prompts_per_step prompts until prompts_per_step groups have spread in
    rollout.dynamic_sampling.metric, or max_generation_batches were generated. Batch k of the step is prompt batch
    step + (extra batches of the earlier steps) + k of the stream; the metric is the verifier's grade or the
    policy's reward: the reward model's score as it stands before the step's update plus the overlong penalty."""
    settings = cfg.rollout.dynamic_sampling
    parts, metric_parts, score_parts, kept = [], [], [], 0
    first = step + counters[EXTRA_BATCHES]
    while kept < cfg.prompts_per_step and len(parts) < settings.max_generation_batches:
        groups = _generation_batch(run, cfg, first + len(parts))
        if settings.metric == "verifier":
            metric = verifier_grades(run.verifier, groups, run.policy_tokenizer)
        else:
            score_parts.append(score_rollouts(run, cfg, groups, step))
            metric = score_parts[-1].rewards + policy_reward_penalty(cfg, groups)
        parts.append(groups)
        metric_parts.append(metric)
        kept += int(groups_with_spread(metric, groups.valid).sum())
    counters[EXTRA_BATCHES] += len(parts) - 1
    groups, metric = concat_groups(parts), torch.cat(metric_parts)
    spread = groups_with_spread(metric, groups.valid)
    policy_groups = spread & (spread.cumsum(dim=0) <= cfg.prompts_per_step)  # the first prompts_per_step kept
    metrics = {"dynamic_sampling/generation_batches": float(len(parts)),
               "dynamic_sampling/groups_kept": float(policy_groups.sum()),
               "dynamic_sampling/dropped_fraction": 1.0 - spread.float().mean().item(),
               "dynamic_sampling/cap_reached": float(kept < cfg.prompts_per_step)}
    scores = concat_scores(score_parts) if score_parts else None
    if scores is not None:
        metrics |= scoring_passes(run.strategy)
    return DynamicSample(groups, policy_groups, metric, metrics, scores)


def concat_scores(parts: list[GroupScores]) -> GroupScores:
    """Several generation batches' scores, in order, as one (dynamic sampling: strategies without R2M's states or
    PRIME's labels, which it refuses)."""
    values = [p.values for p in parts]
    return GroupScores(torch.cat([p.rewards for p in parts]),  # [B, G]
                       None if any(v is None for v in values) else torch.cat(values))  # [B]


def policy_reward_penalty(cfg: Stage3Config, groups: RolloutGroups) -> torch.Tensor:
    """[B, G] what reward.overlong_buffer adds to the policy's reward of each response (0 when off)."""
    buffer = cfg.reward.overlong_buffer
    if not buffer.length:
        return torch.zeros(groups.valid.shape)
    return overlong_penalty(groups.response_lengths, cfg.rollout.sampling.max_new_tokens, buffer.length,
                            buffer.penalty)


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
    scores = score_groups(run.reward_model, groups, pad_id_of(run.reward_tokenizer), score_micro_batch(cfg),
                          cfg.reward.max_tokens_per_micro_batch)
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
