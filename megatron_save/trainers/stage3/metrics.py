"""A stage-3 step's metrics and logs: what the filter did, the rollouts, phase timings, the run's counters, the
rollout log, and the counted skip of a step or phase."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_save.trainers.stage3.groups import FeedbackPartition, GroupScores, RolloutGroups
from megatron_save.trainers.strategies import RMStrategy
from megatron_save.utils.logging import get_logger
from megatron_save.utils.metrics import PhaseTimer

logger = get_logger("trainers.stage3")
_SUMMARY = ("filter/reward_mean", "filter/keep_rate", "filter/kept_prompts_fraction", "rm/reward_loss",
            "rm/value_loss", "rm/grebt_loss", "rm/bt_loss", "policy/pg_loss", "policy/kl_to_reference",
            "policy/entropy", "rollout/response_length", "time/step_s")


def count_skip(counters: Counter, name: str, step: int, what: str) -> None:
    """Counts ``name`` and logs why step ``step`` skips ``what`` (a step, a phase)."""
    counters[name] += 1
    logger.warning("step %d: %s (%d so far)", step, what, counters[name])


def value_only_run_warning(strategy: RMStrategy, counters: Counter, step: int) -> str | None:
    """The warning for a run whose reward-model updates up to ``step`` were all value-only (B~ empty each time:
    only the value head learned) under a strategy that trains the backbone; None otherwise. A response is kept
    when sigmoid(|R - V|) >= mu(t), and a prompt enters B~ with kept responses on both sides of V(x): the
    warning names the settings that usually leave B~ empty."""
    updates, value_only = counters["rm_updates"], counters["value_only_rm_updates"]
    if not (strategy.trains_backbone and strategy.value_head and updates > 0 and value_only >= updates):
        return None
    causes = ["V(x) off the rewards' scale, every response on one side of it (reward.optim.value_head_lr against "
              "reward.optim.lr, or a stage-2 value head that did not fit)"]
    if strategy.curriculum:
        # mu(t) starts at (1 + m0) / 2 and reaches 1/2, which keeps every response, at step m0 * total_steps.
        causes.insert(0, "a curriculum threshold mu(t) above sigmoid(|R - V|) of every response "
                         "(reward.initial_margin too high for the rewards' scale and total_steps)")
    return (f"all {updates} reward-model updates of the {step} steps so far were value-only (B~ empty: no prompt "
            f"kept responses both above and below V(x)), so the reward model's backbone and reward head never "
            f"learned, only its value head. Usual causes: {'; or '.join(causes)}. See filter/kept_prompts_fraction "
            f"and filter/anchor_bias in metrics.jsonl")


def step_summary(metrics: dict[str, float]) -> str:
    """The few numbers worth a log line, of those the step has."""
    return " ".join(f"{name.split('/')[-1]}={metrics[name]:.4g}" for name in _SUMMARY
                    if metrics.get(name) is not None)


def passes(model: str, forward: int = 0, backward: int = 0) -> dict[str, float]:
    """Full-batch passes of ``model`` (the step's sequences through it once; its mini-batches add up to one) as
    ``passes/<model>_forward`` and ``passes/<model>_backward`` metrics, summed over a step by :func:`add_metrics`."""
    counts = {f"passes/{model}_forward": float(forward), f"passes/{model}_backward": float(backward)}
    return {name: count for name, count in counts.items() if count}


def add_metrics(metrics: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """``metrics`` updated with ``new`` in place, pass counts added up; returns it."""
    for name, value in new.items():
        metrics[name] = metrics.get(name, 0.0) + value if name.startswith("passes/") else value
    return metrics


def counter_metrics(counters: Counter) -> dict[str, float]:
    """The run's running counts (skipped steps, value-only updates, ...) as metrics."""
    return {f"counters/{name}": float(count) for name, count in counters.items()}


def finish_step(metrics: dict[str, float], timer: PhaseTimer, counters: Counter,
                completed: RolloutGroups | None = None) -> dict[str, float]:
    """A step's metrics with its phase timings and the run's counters; for a completed step (its groups given),
    the response tokens per second too."""
    metrics = {**metrics, **timer.reset()}
    if completed is not None:
        metrics["throughput/response_tokens_per_s"] = completed.response_lengths.sum().item() / metrics["time/step_s"]
    return {**metrics, **counter_metrics(counters)}


def feedback_metrics(groups: RolloutGroups, scores: GroupScores, partition: FeedbackPartition, prefix: str
                     ) -> dict[str, float]:
    """What the filter and partition did, and how the scores look, under ``prefix/``."""
    valid = groups.valid
    rewards = scores.rewards[valid]
    metrics = {
        "threshold_mu": partition.threshold,
        "keep_rate": partition.kept.sum().item() / max(valid.sum().item(), 1),
        "reward_mean": rewards.mean().item() if rewards.numel() else float("nan"),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else float("nan"),
    }
    if partition.anchor is not None:
        has = valid.any(dim=1)
        mean_reward = scores.rewards.nan_to_num(0.0).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        gap = (partition.anchor - mean_reward)[has]
        metrics.update({
            "kept_prompts_fraction": partition.prompt_keep.float().mean().item(),  # |B~| / |B|
            "positives_per_prompt": partition.pos_mask.sum(dim=1).float().mean().item(),  # |Y+|
            "negatives_per_prompt": partition.neg_mask.sum(dim=1).float().mean().item(),  # |Y-|
            "anchor_mean": partition.anchor[has].mean().item(),
            "anchor_bias": gap.mean().item(),  # calibration: anchor - mean reward of the group
            "anchor_abs_error": gap.abs().mean().item(),
        })
    return {f"{prefix}/{name}": value for name, value in metrics.items()}


def rollout_metrics(groups: RolloutGroups) -> dict[str, float]:
    """Response lengths, truncation and the invalid responses of a batch."""
    metrics = {"rollout/response_length": groups.response_lengths.float().mean().item(),
               "rollout/truncated_fraction": groups.truncated.float().mean().item(),
               "rollout/valid_fraction": groups.valid.float().mean().item()}
    for reason, count in groups.skipped.items():
        metrics[f"rollout/invalid/{reason}"] = float(count)
    return metrics


@dataclass
class PolicyUpdateInputs:
    """What a step's policy update learned from, for the rollout log (B prompts, G responses, T tokens)."""

    rewards: torch.Tensor
    """[B, G] the rewards its advantages came from: the re-score after the RM update (the first scoring with
    lagged scores or a reward model that does not learn), NaN on invalid slots."""
    kept: torch.Tensor
    """[B, G] bool, the responses it trained on."""
    advantages: list[torch.Tensor]
    """Each kept response's per-token advantages as handed to the update, [len(response)] each, in the order of
    ``kept.nonzero()``."""
    outcome_labels: torch.Tensor | None = None
    """PRIME: [B, G] the outcome labels."""
    process_rewards: torch.Tensor | None = None
    """PRIME: [B, G, T] the implicit PRM's token rewards."""
    overlong_penalty: torch.Tensor | None = None
    """reward.overlong_buffer: [B, G] the penalty ``rewards`` include (the reward model's score is rewards - it)."""
    policy_groups: torch.Tensor | None = None
    """rollout.dynamic_sampling: [B] bool, the groups the policy could train on (spread in the metric)."""
    rollout_correction: list[Any] | None = None
    """policy.rollout_correction: each kept response's CorrectedRow (old / rollout log-probs, IS weights, kept
    tokens), in the order of ``kept.nonzero()``."""


def _finite_or_none(values: list[float]) -> list[float | None]:
    return [v if v == v else None for v in values]  # NaN (an invalid slot) -> null


def _policy_update_row(update: PolicyUpdateInputs, b: int, response_lengths: list[int]) -> dict[str, Any]:
    """Prompt ``b``'s part of ``update`` as JSON: null advantages (and PRIME token rewards) off the kept slots."""
    advantages: list[list[float] | None] = [None] * len(response_lengths)
    for (row, g), values in zip(update.kept.nonzero().tolist(), update.advantages):
        if row == b:
            advantages[g] = values.tolist()
    entry = {"rewards": _finite_or_none(update.rewards[b].tolist()), "kept": update.kept[b].tolist(),
             "advantages": advantages}
    if update.outcome_labels is not None:
        entry["outcome_labels"] = update.outcome_labels[b].tolist()
    if update.process_rewards is not None:
        entry["process_rewards"] = [update.process_rewards[b, g, :length].tolist() if update.kept[b, g] else None
                                    for g, length in enumerate(response_lengths)]
    if update.overlong_penalty is not None:
        entry["overlong_penalty"] = update.overlong_penalty[b].tolist()
    if update.policy_groups is not None:
        entry["group_kept"] = bool(update.policy_groups[b])
    if update.rollout_correction is not None:
        corrected: list[dict[str, list] | None] = [None] * len(response_lengths)
        for (row, g), values in zip(update.kept.nonzero().tolist(), update.rollout_correction):
            if row == b:
                corrected[g] = dataclasses.asdict(values)
        entry["rollout_correction"] = corrected
    return entry


def append_rollout_log(path: str | Path, step: int, groups: RolloutGroups, scores: GroupScores,
                       partition: FeedbackPartition, policy_tokenizer: Any,
                       policy_update: PolicyUpdateInputs | None = None) -> None:
    """Rank 0 appends one JSON line per prompt of the step: the prompt's messages, its responses as the reward
    model read them, R (null when invalid), V, which responses the filter kept (all before any RM update), the
    responses' policy-token lengths, and what the policy update learned from (null without one)."""
    if torch.distributed.get_rank() != 0:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        for b, responses in enumerate(groups.policy_response_ids):
            lengths = groups.response_lengths[b].tolist()
            log.write(json.dumps({
                "step": step,
                "prompt": groups.prompts[b],
                "responses": [policy_tokenizer.decode(r, skip_special_tokens=True) for r in responses],
                "rewards": _finite_or_none(scores.rewards[b].tolist()),
                "value": None if scores.values is None else _finite_or_none([scores.values[b].item()])[0],
                "valid": groups.valid[b].tolist(),
                "kept": partition.kept[b].tolist(),
                "response_lengths": lengths,
                "policy_update": None if policy_update is None else _policy_update_row(policy_update, b, lengths),
            }) + "\n")
