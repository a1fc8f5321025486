"""The reward-model phase of stage 3: before the policy update (Algorithm 2, lines 7-15), one optimizer step by the
strategy's loss on the step's rollouts (a single forward-backward that also scores them) or on static pairs, and
the re-score; or PRIME's implicit-PRM update; after it, R2M's head update."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_save.data.batching import length_grouped_batches, pad_id_of
from megatron_save.data.preference import PreferencePair
from megatron_save.models.forward import broadcast_from_last_stage
from megatron_save.models.train_state import TrainState
from megatron_save.trainers.common import BatchSettings, pair_micro_batches, pairwise_eval
from megatron_save.trainers.optimizer import backbone_frozen, scale_backbone_gradients
from megatron_save.trainers.losses import gradient_cache_loss, group_loss_gradients
from megatron_save.trainers.stage3.batches import (
    prompts_per_rank,
    response_group_batches,
    response_slot_partition,
    scored_row_batches,
)
from megatron_save.trainers.stage3.config import RewardSettings, Stage3Config
from megatron_save.trainers.stage3.groups import (
    FeedbackPartition,
    GroupScores,
    RolloutGroups,
    non_finite_scores,
    rm_trained,
)
from megatron_save.trainers.stage3.metrics import add_metrics, passes
from megatron_save.trainers.stage3.prime import update_implicit_prm, with_process_rewards
from megatron_save.trainers.stage3.r2m import update_r2m_after_policy
from megatron_save.trainers.stage3.rollout_phase import r2m_omega, score_micro_batch, score_rollouts, scoring_passes
from megatron_save.trainers.stage3.run import Stage3Run
from megatron_save.trainers.stage3.verifier import verifier_grades
from megatron_save.trainers.step import forward_backward, optimizer_step, train_step
from megatron_save.trainers.strategies import RMStrategy
from megatron_save.utils.logging import get_logger
from megatron_save.utils.metrics import PhaseTimer

logger = get_logger("trainers.stage3")


@dataclass
class RolloutUpdate:
    """A reward-model update on the step's rollouts (SAVE, Mean Reward, HL-BT), which is also their scoring: one
    forward-backward scores every response, partitions each group and trains on the partition."""

    scores: GroupScores
    """R (and V) of every valid response from the update's own forward: the pre-update reward model's."""
    reward_count: int
    """What the reward term averaged over in the whole batch: |B~| (kept prompts), or HL-BT's pairs."""
    metrics: dict[str, float]
    """rm/* metrics of the update."""
    stepped: bool
    """The optimizer stepped: the reward model changed and the batch needs its re-score."""
    forwards: int = 1
    """Reward-model forwards of the update: 1 fused, 2 with a token budget's gradient cache (1 when it skipped)."""
    backwards: int = 1
    """Reward-model backwards of the update (0 when a token-budget update skipped before its backward)."""


def update_on_rollouts(run: Stage3Run, cfg: Stage3Config, groups: RolloutGroups, threshold: float,
                       timer: PhaseTimer) -> RolloutUpdate:
    """Collective: Algorithm 2, lines 7-14 of the step in one reward-model forward-backward
    (``update_reward_model``), leaving truncated responses out of the update with
    ``reward.update_skips_truncated``."""
    trained = rm_trained(groups, cfg.reward.update_skips_truncated)
    grades = verifier_grades(run.verifier, groups, run.policy_tokenizer) if run.strategy.verifier_grades else None
    with timer.phase("rm_update"), run.offload.resident("reward"):
        update = update_reward_model(run.reward_state, run.strategy, cfg.reward, groups, trained, threshold,
                                     pad_id_of(run.reward_tokenizer), run.reward_model.has_value_head, grades)
    update.metrics["rm/truncated_left_out"] = float((groups.valid & ~trained).sum())
    return update


def update_reward_model(state: TrainState, strategy: RMStrategy, settings: RewardSettings, groups: RolloutGroups,
                        trained: torch.Tensor, threshold: float, pad_id: int, value_head: bool,
                        grades: torch.Tensor | None = None) -> RolloutUpdate:
    """Collective: the strategy's loss on the last pipeline stage reads R (and V) of each micro-batch's groups,
    partitions them at mu(t) = ``threshold`` over the ``trained`` [B, G] responses and returns the reward term's
    sum with the value term's mean (micro-batches hold whole groups, so a partition is local); the scores and
    sums then come back from every rank, and the optimizer steps on the backbone's gradient divided by the
    batch's count (Megatron's per-token-loss normalisation, with a count per term), unless the scores are not
    finite or there is nothing to learn. ``grades`` [B, G]: a verifier's, for a strategy whose pairs they label."""
    if settings.max_tokens_per_micro_batch:
        return _update_with_gradient_cache(state, strategy, settings, groups, trained, threshold, pad_id,
                                           value_head, grades)
    loss_fn = (partial(strategy.loss, value_loss_weight=settings.value_loss_weight) if strategy.value_head
               else strategy.loss)
    micro_batches = response_group_batches(groups, trained, threshold, settings.micro_batch_size, pad_id,
                                           parallel_state.get_data_parallel_world_size(),
                                           parallel_state.get_data_parallel_rank(), grades)
    outputs = forward_backward(state, micro_batches, loss_fn)
    scores, sums = gather_rollout_outputs(outputs, groups, settings.micro_batch_size, value_head)
    reward_sum, reward_count, value_sum = sums.tolist()
    return _step_on_update(state, strategy, scores, groups, trained, reward_sum, reward_count, value_sum)


def _step_on_update(state: TrainState, strategy: RMStrategy, scores: GroupScores, groups: RolloutGroups,
                    trained: torch.Tensor, reward_sum: float, reward_count: float, value_sum: float,
                    backward: Callable[[], None] | None = None) -> RolloutUpdate:
    """Collective: the optimizer step of a rollout update whose gradients are in the buffers (or that
    ``backward`` puts there, run only when the step is taken), with the checks and metrics of
    ``update_reward_model``."""
    value_count = int(trained.any(dim=1).sum())
    if non_finite_scores(scores, groups.valid) or (reward_count == 0 and not (strategy.value_head and value_count)):
        # Non-finite scores skip the step (its caller counts it); with nothing to learn, an optimizer step on a
        # zero gradient would still move Adam's weights.
        return RolloutUpdate(scores, int(reward_count), {"rm/reward_loss": 0.0, "rm/update_skipped": 1.0},
                             stepped=False)
    if backward is not None:
        backward()
    if reward_count == 0:
        # Value-only (B~ empty): the backbone and reward head stay where they are (with a zero gradient, Adam's
        # momentum would still move them). A MoE backbone's load-balancing loss leaves router and expert gradients
        # where the backbone's backward ran (under PP it always does): zeroed, so that the gradient norm, and the
        # value head's clipping with it, is the value head's alone at every layout.
        scale_backbone_gradients(state, 0.0)
        with backbone_frozen(state):
            step = optimizer_step(state)
    else:
        scale_backbone_gradients(state, 1.0 / reward_count)
        step = optimizer_step(state)
    metrics = {"rm/reward_loss": reward_sum / max(reward_count, 1), "rm/grad_norm": step["grad_norm"],
               "rm/update_skipped": step["update_skipped"]}
    if strategy.value_head:
        metrics["rm/value_loss"] = value_sum / max(value_count, 1)
    return RolloutUpdate(scores, int(reward_count), metrics, stepped=not step["update_skipped"])


def _update_with_gradient_cache(state: TrainState, strategy: RMStrategy, settings: RewardSettings,
                                groups: RolloutGroups, trained: torch.Tensor, threshold: float, pad_id: int,
                                value_head: bool, grades: torch.Tensor | None) -> RolloutUpdate:
    """Collective: ``update_reward_model`` under reward.max_tokens_per_micro_batch, where a group may span
    micro-batches while its loss couples its responses (SAVE, Mean Reward, HL-BT): a forward without gradients
    scores every response (R and V), the strategy's ``group_terms`` over whole groups gives each response's
    dJ/dR and dJ/dV (``group_loss_gradients``), then one forward-backward of sum(R x dJ/dR + V x dJ/dV) per
    micro-batch puts exactly the whole-group loss's gradient in the buffers. Two RM forwards and one backward
    (the fixed micro-batches' fused update: one of each); the loss values come from the first forward."""
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    parts = response_slot_partition(groups, settings.max_tokens_per_micro_batch, ranks)
    outputs = forward_backward(state, scored_row_batches(groups, parts[rank], pad_id, ranks), gradient_cache_loss,
                               forward_only=True)
    raw_rewards, raw_values = _gather_row_scores(outputs, parts, groups)  # [B, G], [B] (raw: every slot)
    values = raw_values if value_head else None
    terms, reward_grad, value_grad = group_loss_gradients(
        strategy.group_terms, raw_rewards, values, trained, threshold, grades, settings.value_loss_weight)
    scores = GroupScores(raw_rewards.masked_fill(~groups.valid, float("nan")),
                         None if values is None else values.masked_fill(~groups.valid.any(dim=1), float("nan")))
    micro_batches = scored_row_batches(groups, parts[rank], pad_id, ranks, reward_grad, value_grad)
    value_sum = 0.0 if terms.value_sum is None else float(terms.value_sum)
    update = _step_on_update(state, strategy, scores, groups, trained, float(terms.reward_sum),
                             float(terms.reward_count), value_sum,
                             backward=lambda: forward_backward(state, micro_batches, gradient_cache_loss))
    ran_backward = "rm/grad_norm" in update.metrics
    update.forwards, update.backwards = 1 + ran_backward, int(ran_backward)
    return update


def _gather_row_scores(outputs: list[dict[str, torch.Tensor]], parts: list[list[list[int]]],
                       groups: RolloutGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: R [B, G] of every slot and V [B] (slot 0 of each group; NaN without a value head) on every rank,
    from the last pipeline stage's per-micro-batch rows of each data-parallel rank (``parts[r]``: rank r's flat
    slots, its micro-batches in order)."""
    prompts, group_size = groups.valid.shape
    rank = parallel_state.get_data_parallel_rank()
    per_rank = sum(len(part) for part in parts[rank])
    local = None
    if parallel_state.is_pipeline_last_stage():
        order = torch.tensor([slot for part in parts[rank] for slot in part])
        read = torch.stack([torch.cat([o["rewards"] for o in outputs]), torch.cat([o["values"] for o in outputs])],
                           dim=1).float()  # [rows, 2] in micro-batch order
        local = torch.empty_like(read)
        local[order - order.min()] = read  # slot order (a rank's slots are consecutive)
    local = broadcast_from_last_stage(local, (per_rank, 2), torch.float32)
    group = parallel_state.get_data_parallel_group()
    gathered = torch.empty(dist.get_world_size(group) * per_rank, 2, dtype=torch.float32, device=local.device)
    dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
    gathered = gathered.cpu().view(-1, group_size, 2)[:prompts]  # [B, G, 2]
    return gathered[..., 0], gathered[:, 0, 1]


def gather_rollout_outputs(outputs: list[dict[str, torch.Tensor]], groups: RolloutGroups, micro_batch_size: int,
                           value_head: bool) -> tuple[GroupScores, torch.Tensor]:
    """Collective: the scores of the whole batch and the sums of reward loss, reward count and value loss [3],
    on every rank, from the last pipeline stage's per-micro-batch ROLLOUT_LOSS_OUTPUTS of each data-parallel
    rank (rank r holds prompts_per_rank consecutive prompts)."""
    prompts, group_size = groups.valid.shape
    per_rank = prompts_per_rank(prompts, parallel_state.get_data_parallel_world_size(), micro_batch_size)
    width = per_rank * (group_size + 1) + 3
    local = None
    if parallel_state.is_pipeline_last_stage():
        sums = torch.stack([torch.stack([o["reward_loss_sum"], o["reward_count"], o["value_loss_sum"]])
                            for o in outputs]).sum(dim=0)
        local = torch.cat([torch.cat([o["rewards"] for o in outputs]), torch.cat([o["values"] for o in outputs]),
                           sums]).float()
    local = broadcast_from_last_stage(local, (width,), torch.float32)
    group = parallel_state.get_data_parallel_group()
    gathered = torch.empty(dist.get_world_size(group) * width, dtype=torch.float32, device=local.device)
    dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
    gathered = gathered.view(-1, width).cpu()
    rewards = gathered[:, : per_rank * group_size].reshape(-1, group_size)[:prompts]  # [B, G]
    rewards = rewards.masked_fill(~groups.valid, float("nan"))
    values = None
    if value_head:
        values = gathered[:, per_rank * group_size : per_rank * (group_size + 1)].reshape(-1)[:prompts]  # [B]
        values = values.masked_fill(~groups.valid.any(dim=1), float("nan"))
    return GroupScores(rewards, values), gathered[:, -3:].sum(dim=0)


def reward_phase(run: Stage3Run, cfg: Stage3Config, step: int, groups: RolloutGroups, scores: GroupScores,
                 partition: FeedbackPartition, update: RolloutUpdate | None, counters: Counter, timer: PhaseTimer
                 ) -> tuple[GroupScores | None, dict[str, float]]:
    """Collective: the reward-model side of a step before the policy update: for an update on the rollouts
    (``update``, already taken), its metrics and the re-score (Algorithm 2, line 15; skipped with
    ``reward.lagged_scores`` or when nothing changed); otherwise continual offline BT's update and the re-score,
    or PRIME's implicit PRM, whose token rewards join the scores. Returns the scores the policy update uses."""
    if run.strategy.implicit_prm:
        trained = rm_trained(groups, cfg.reward.update_skips_truncated)
        metrics = {"rm/truncated_left_out": float((groups.valid & ~trained).sum())}
        return prime_phase(run, cfg, groups, scores, partition, partition.kept & trained, timer, metrics)
    counters["rm_updates"] += 1  # the denominator of value_only_rm_updates (value_only_run_warning)
    if update is not None:
        metrics = update.metrics
        if run.strategy.value_head and update.reward_count == 0:
            counters["value_only_rm_updates"] += 1
            logger.info("step %d: no prompt with both Y+ and Y- for the RM update; value-only update", step)
        if not update.stepped or cfg.reward.lagged_scores:
            return scores, metrics
    else:
        with timer.phase("rm_update"), run.offload.resident("reward"):
            metrics = _update_on_offline_pairs(run.reward_state, run.strategy, cfg.reward, run.offline_pairs, step,
                                               pad_id_of(run.reward_tokenizer), cfg.seed)
        metrics["rm/truncated_left_out"] = 0.0
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


def _update_on_offline_pairs(state: TrainState, strategy: RMStrategy, settings: RewardSettings,
                             pairs: list[PreferencePair], step: int, pad_id: int, seed: int) -> dict[str, float]:
    """Continual offline BT: one optimizer step on the step's batch of static pairs."""
    indices = offline_pair_indices([p.length for p in pairs], settings.offline_batch_size, step, seed)
    batch = BatchSettings(global_batch_size=settings.offline_batch_size, micro_batch_size=settings.micro_batch_size)
    metrics = train_step(state, pair_micro_batches(pairs, indices, batch, pad_id), strategy.loss,
                         strategy.loss_metrics)
    return {"rm/bt_loss": metrics["loss"], "rm/bt_accuracy": metrics["accuracy"], "rm/grad_norm": metrics["grad_norm"]}


def probe_metrics(run: Stage3Run, cfg: Stage3Config) -> dict[str, float]:
    """Collective: the reward model's accuracy on reward.probe_data's fixed pairs (chosen scored strictly above
    rejected), as it stands before the step's update."""
    accuracy = pairwise_eval(run.reward_model, run.probe_pairs, score_micro_batch(cfg),
                             pad_id_of(run.reward_tokenizer), description=None)
    return {"rm_probe/accuracy": accuracy, **passes("reward_probe", forward=1)}


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
