"""The reward-model step of stage 3 (Algorithm 2, lines 12-14) for SAVE and each baseline's update rule."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state

from megatron_save.algorithms import highest_lowest_pairs
from megatron_save.data.batching import ResponseGroupBatch, length_grouped_batches, pad_rows
from megatron_save.data.preference import PreferencePair
from megatron_save.trainers.common import BatchSettings
from megatron_save.trainers.losses import bt_pair_loss, hl_bt_rm_loss, mean_reward_rm_loss, save_rm_loss
from megatron_save.trainers.optimizer import TrainState, backbone_frozen
from megatron_save.trainers.rl_groups import FeedbackPartition, GroupScores, RolloutGroups
from megatron_save.trainers.stage1_bt import pair_micro_batches
from megatron_save.trainers.stage3_config import RewardSettings
from megatron_save.trainers.step import train_step

TRAINED_STRATEGIES = ("save", "save_no_curriculum", "offline_bt", "mean_reward", "hl_bt")


def response_group_micro_batches(groups: RolloutGroups, partition: FeedbackPartition, micro_batch_size: int,
                                 pad_id: int, reward_count: int, value_count: int) -> list[ResponseGroupBatch]:
    """This data-parallel rank's micro-batches of ``micro_batch_size`` prompts x G slots.

    The B prompts are padded with empty groups (no valid slot: they add nothing) to a multiple of data-parallel
    size x micro_batch_size and split contiguously over data-parallel ranks. ``reward_count`` / ``value_count``
    are the whole batch's denominators of the reward and value means (kept prompts or pairs; prompts with a
    response); a zero count switches its term off.
    """
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    prompts, group_size = groups.valid.shape
    per_rank = -(-prompts // (ranks * micro_batch_size)) * micro_batch_size
    mine = [i for i in range(rank * per_rank, (rank + 1) * per_rank)]
    slots = [(i, j) for i in mine for j in range(group_size)]
    real = lambda i, j: i < prompts and bool(groups.valid[i, j])  # noqa: E731
    sequences = [groups.rm_sequences[i][j] if i < prompts else groups.rm_sequences[0][0] for i, j in slots]
    width = max(len(s) for row in groups.rm_sequences for s in row)
    input_ids, attention_mask = pad_rows(sequences, pad_id, width)
    flag = lambda mask: torch.tensor([i < prompts and bool(mask[i, j]) for i, j in slots])  # noqa: E731
    micro_batches = per_rank // micro_batch_size
    scale = lambda count: micro_batches * ranks / count if count else 0.0  # noqa: E731
    batch = ResponseGroupBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        # An invalid slot holds the prompt alone, so V is read at the same position in every slot of a group.
        prompt_lengths=torch.tensor([groups.rm_prompt_lengths[i] if i < prompts else 1 for i, _ in slots]),
        valid=torch.tensor([real(i, j) for i, j in slots]),
        pos_mask=flag(partition.pos_mask),
        neg_mask=flag(partition.neg_mask),
        group_size=group_size,
        reward_scale=scale(reward_count),
        value_scale=scale(value_count),
    )
    return batch.split(micro_batch_size * group_size)


def offline_pair_indices(lengths: list[int], batch_size: int, step: int, seed: int) -> list[int]:
    """The static pairs of RM update ``step`` (1-based) for offline_bt: epochs of length-grouped batches in a
    seeded order, a function of the step alone (so a resumed run continues the same sequence)."""
    per_epoch = len(lengths) // batch_size
    if per_epoch == 0:
        raise ValueError(f"reward.offline_data has {len(lengths)} pairs, fewer than offline_batch_size={batch_size}")
    epoch, index = divmod(step - 1, per_epoch)
    return length_grouped_batches(lengths, batch_size, seed=seed + epoch)[index]


def update_reward_model(state: TrainState, settings: RewardSettings, groups: RolloutGroups, scores: GroupScores,
                        partition: FeedbackPartition, step: int, pad_id: int, seed: int,
                        offline_pairs: list[PreferencePair] | None = None) -> dict[str, float]:
    """One optimizer step of the reward model by its strategy's rule; returns the step's metrics."""
    strategy = settings.strategy
    if strategy == "offline_bt":
        indices = offline_pair_indices([p.length for p in offline_pairs], settings.offline_batch_size, step, seed)
        batch = BatchSettings(global_batch_size=settings.offline_batch_size,
                              micro_batch_size=settings.micro_batch_size)
        micro_batches = pair_micro_batches(offline_pairs, indices, batch, pad_id)
        metrics = train_step(state, micro_batches, bt_pair_loss, ("loss", "accuracy"))
        return {"rm/bt_loss": metrics["loss"], "rm/bt_accuracy": metrics["accuracy"],
                "rm/grad_norm": metrics["grad_norm"]}
    value_count = int(groups.valid.any(dim=1).sum())
    if strategy == "hl_bt":
        reward_count = int(highest_lowest_pairs(scores.rewards.nan_to_num(0.0), groups.valid)[2].sum())
        loss_fn, names = hl_bt_rm_loss, ("reward_loss_sum", "pairs")
    elif strategy == "mean_reward":
        reward_count = int(partition.prompt_keep.sum())
        loss_fn, names = mean_reward_rm_loss, ("reward_loss_sum", "kept_prompts")
    else:
        reward_count = int(partition.prompt_keep.sum())
        loss_fn = partial(save_rm_loss, value_loss_weight=settings.value_loss_weight)
        names = ("reward_loss_sum", "value_loss_sum", "kept_prompts")
    learns_value = strategy in ("save", "save_no_curriculum") and value_count > 0
    if reward_count == 0 and not learns_value:
        # Nothing to learn from: an optimizer step on a zero gradient would still move Adam's weights.
        return {"rm/reward_loss": 0.0, "rm/update_skipped": 1.0}
    micro_batches = response_group_micro_batches(groups, partition, settings.micro_batch_size, pad_id,
                                                 reward_count, value_count)
    if reward_count == 0:
        # SAVE with no prompt in B~: the value loss alone, and the backbone and reward head must stay where they are
        # (with a zero gradient, Adam's momentum would still move them).
        with backbone_frozen(state):
            metrics = train_step(state, micro_batches, loss_fn, names)
    else:
        metrics = train_step(state, micro_batches, loss_fn, names)
    # train_step averages micro-batch sums over micro-batches x ranks: undo it to report the batch means.
    total = len(micro_batches) * parallel_state.get_data_parallel_world_size()
    report = {"rm/reward_loss": metrics["reward_loss_sum"] * total / max(reward_count, 1),
              "rm/grad_norm": metrics["grad_norm"], "rm/update_skipped": metrics["update_skipped"]}
    if "value_loss_sum" in metrics:
        report["rm/value_loss"] = metrics["value_loss_sum"] * total / max(value_count, 1)
    return report
