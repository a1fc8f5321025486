"""The reward-model phase of stage 3: before the policy update (Algorithm 2, lines 12-15), one optimizer step by
the strategy's loss on the step's rollouts or on static pairs and the re-score, or PRIME's implicit-PRM update;
after it, R2M's head update."""

from __future__ import annotations

from collections import Counter
from functools import partial

import torch
from megatron.core import parallel_state

from megatron_save.data.batching import length_grouped_batches, pad_id_of
from megatron_save.data.preference import PreferencePair
from megatron_save.models.train_state import TrainState
from megatron_save.trainers.common import BatchSettings, pair_micro_batches
from megatron_save.trainers.optimizer import backbone_frozen
from megatron_save.trainers.stage3.batches import response_group_batches
from megatron_save.trainers.stage3.config import RewardSettings, Stage3Config
from megatron_save.trainers.stage3.groups import FeedbackPartition, GroupScores, RolloutGroups, rm_update_feedback
from megatron_save.trainers.stage3.prime import update_implicit_prm, with_process_rewards
from megatron_save.trainers.stage3.r2m import update_r2m_after_policy
from megatron_save.trainers.stage3.metrics import add_metrics, passes
from megatron_save.trainers.stage3.rollout_phase import r2m_omega, score_micro_batch, score_rollouts, scoring_passes
from megatron_save.trainers.stage3.run import Stage3Run
from megatron_save.trainers.step import train_step
from megatron_save.trainers.strategies import RMStrategy
from megatron_save.utils.logging import get_logger
from megatron_save.utils.metrics import PhaseTimer

logger = get_logger("trainers.stage3")


def reward_phase(run: Stage3Run, cfg: Stage3Config, step: int, groups: RolloutGroups, scores: GroupScores,
                 partition: FeedbackPartition, counters: Counter, timer: PhaseTimer
                 ) -> tuple[GroupScores | None, dict[str, float]]:
    """Collective: the update before the policy's on the step's feedback, leaving truncated responses out with
    ``reward.update_skips_truncated``: the reward model's (Algorithm 2, lines 12-14), then the re-score (line 15);
    or PRIME's implicit PRM, whose token rewards join the scores. Returns the scores the policy update uses."""
    rm_groups, rm_partition = rm_update_feedback(run.strategy, groups, scores, partition,
                                                 cfg.reward.update_skips_truncated)
    metrics = {"rm/truncated_left_out": float((groups.valid & ~rm_groups.valid).sum())}
    if run.strategy.implicit_prm:
        return prime_phase(run, cfg, groups, scores, partition, rm_partition.kept, timer, metrics)
    counters["rm_updates"] += 1  # the denominator of value_only_rm_updates (value_only_run_warning)
    if run.strategy.value_head and not rm_partition.prompt_keep.any():
        counters["value_only_rm_updates"] += 1
        logger.info("step %d: no prompt with both Y+ and Y- for the RM update; value-only update", step)
    with timer.phase("rm_update"), run.offload.resident("reward"):
        metrics |= update_reward_model(run.reward_state, run.strategy, cfg.reward, rm_groups, scores, rm_partition,
                                       step, pad_id_of(run.reward_tokenizer), cfg.seed, run.offline_pairs)
    if "rm/grad_norm" in metrics:  # an update with nothing to learn returns before any pass
        add_metrics(metrics, passes("reward", forward=1, backward=1))
    with timer.phase("rescore"):
        scores = score_rollouts(run, cfg, groups, step)
    return scores, add_metrics(metrics, scoring_passes(run.strategy))


def prime_phase(run: Stage3Run, cfg: Stage3Config, groups: RolloutGroups, scores: GroupScores,
                partition: FeedbackPartition, trained: torch.Tensor, timer: PhaseTimer, metrics: dict[str, float]
                ) -> tuple[GroupScores, dict[str, float]]:
    """Collective: PRIME's PRM rewards of the kept responses and its update on the ``trained`` ones [B, G]
    (the frozen reward model is not re-scored: it did not change)."""
    if not partition.kept.any():
        return scores, metrics | {"prm/update_skipped": 1.0}
    with timer.phase("rm_update"), run.offload.resident("prm", "reference"):
        process_rewards, prm_metrics = update_implicit_prm(
            run.prm_state, run.prm_reference, run.strategy, cfg.reward.prime, groups, partition.kept, trained,
            scores.outcome.labels, pad_id_of(run.policy_tokenizer))
    # Token rewards (PRM and reference forwards), the update's forward-backward, the double forward's re-score.
    updated = int(prm_metrics["prm/trained_responses"] > 0)
    forwards = 1 + updated * (1 + int(cfg.reward.prime.recompute_after_update))
    reference = "reference" if run.prm_reference is run.reference else "prm_reference"
    prm_passes = passes("prm", forward=forwards, backward=updated) | passes(reference, forward=1)
    return with_process_rewards(scores, process_rewards), metrics | prm_metrics | prm_passes


def offline_pair_indices(lengths: list[int], batch_size: int, step: int, seed: int) -> list[int]:
    """The static pairs of RM update ``step`` (1-based) for offline_bt: epochs of length-grouped batches in a
    seeded order, a function of the step alone (so a resumed run continues the same sequence)."""
    per_epoch = len(lengths) // batch_size
    if per_epoch == 0:
        raise ValueError(f"reward.offline_data has {len(lengths)} pairs, fewer than offline_batch_size={batch_size}")
    epoch, index = divmod(step - 1, per_epoch)
    return length_grouped_batches(lengths, batch_size, seed=seed + epoch)[index]


def update_reward_model(state: TrainState, strategy: RMStrategy, settings: RewardSettings, groups: RolloutGroups,
                        scores: GroupScores, partition: FeedbackPartition, step: int, pad_id: int, seed: int,
                        offline_pairs: list[PreferencePair] | None = None) -> dict[str, float]:
    """Collective: one optimizer step of the reward model by its strategy's loss; returns the step's metrics."""
    if strategy.learns_from == "offline_pairs":
        return _update_on_offline_pairs(state, strategy, settings, offline_pairs, step, pad_id, seed)
    value_count = int(groups.valid.any(dim=1).sum())
    reward_count = int(strategy.reward_prompts(scores.rewards, groups.valid, partition).sum())
    learns_value = strategy.value_head and value_count > 0
    if reward_count == 0 and not learns_value:
        # Nothing to learn from: an optimizer step on a zero gradient would still move Adam's weights.
        return {"rm/reward_loss": 0.0, "rm/update_skipped": 1.0}
    loss_fn = (partial(strategy.loss, value_loss_weight=settings.value_loss_weight) if strategy.value_head
               else strategy.loss)
    ranks = parallel_state.get_data_parallel_world_size()
    micro_batches = response_group_batches(groups, partition, settings.micro_batch_size, pad_id, reward_count,
                                           value_count, ranks, parallel_state.get_data_parallel_rank())
    if reward_count == 0:
        # A value-only update (no prompt in B~): the backbone and reward head must stay where they are (with a
        # zero gradient, Adam's momentum would still move them).
        with backbone_frozen(state):
            metrics = train_step(state, micro_batches, loss_fn, strategy.loss_metrics)
    else:
        metrics = train_step(state, micro_batches, loss_fn, strategy.loss_metrics)
    # train_step averages micro-batch sums over micro-batches x ranks: undo it to report the batch means.
    total = len(micro_batches) * ranks
    report = {"rm/reward_loss": metrics["reward_loss_sum"] * total / max(reward_count, 1),
              "rm/grad_norm": metrics["grad_norm"], "rm/update_skipped": metrics["update_skipped"]}
    if "value_loss_sum" in metrics:
        report["rm/value_loss"] = metrics["value_loss_sum"] * total / max(value_count, 1)
    return report


def _update_on_offline_pairs(state: TrainState, strategy: RMStrategy, settings: RewardSettings,
                             pairs: list[PreferencePair], step: int, pad_id: int, seed: int) -> dict[str, float]:
    """Continual offline BT: one optimizer step on the step's batch of static pairs."""
    indices = offline_pair_indices([p.length for p in pairs], settings.offline_batch_size, step, seed)
    batch = BatchSettings(global_batch_size=settings.offline_batch_size, micro_batch_size=settings.micro_batch_size)
    metrics = train_step(state, pair_micro_batches(pairs, indices, batch, pad_id), strategy.loss,
                         strategy.loss_metrics)
    return {"rm/bt_loss": metrics["loss"], "rm/bt_accuracy": metrics["accuracy"], "rm/grad_norm": metrics["grad_norm"]}


def r2m_phase(run: Stage3Run, cfg: Stage3Config, step: int, groups: RolloutGroups, scores: GroupScores,
              timer: PhaseTimer) -> dict[str, float]:
    """Collective: R2M's GREBT step of its head after the policy update, on the updated policy's states."""
    omega = r2m_omega(cfg, step)
    with timer.phase("rm_update"), run.offload.resident("r2m_head"):
        metrics = update_r2m_after_policy(run.r2m_state, run.policy, groups, scores.feedback, omega,
                                          cfg.reward.r2m_alpha, pad_id_of(run.policy_tokenizer),
                                          score_micro_batch(cfg))
    # The updated policy's hidden states, then the head's forward-backward (not a backbone pass).
    return {"r2m/omega": omega, **metrics, **passes("policy", forward=1), **passes("r2m_head", forward=1, backward=1)}
