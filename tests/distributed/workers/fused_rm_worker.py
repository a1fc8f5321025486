"""torchrun worker (4 processes): the fused reward-model update (one forward-backward that scores, partitions and
trains) against the three-pass reference it replaces (a no-grad scoring forward, the partition, then a
forward-backward on the precomputed partition with the batch's counts known in advance), at TP1 x DP4, TP2 x DP2,
PP2 x DP2 and TP2 x PP2 x DP1, for SAVE (with a non-empty and an empty B~), Mean Reward and HL-BT.

Writes {"<layout>-<case>": {"fused": {...}, "oracle": {...}, "param_rel_diff": x, "value_head_change": y,
"backbone_change": z}} to --out.
"""

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage3_worker import fixed_rollouts, run_every_layout  # noqa: E402

from megatron_save.algorithms import (  # noqa: E402
    highest_lowest_pairs,
    hl_bt_loss,
    mean_reward_anchor,
    save_reward_loss,
    value_anchor_loss,
)
from megatron_save.checkpoint import build_model_from_checkpoint  # noqa: E402
from megatron_save.data.batching import ResponseGroupBatch  # noqa: E402
from megatron_save.models.forward import at_last_token  # noqa: E402
from megatron_save.trainers.optimizer import OptimizerSettings, backbone_frozen, build_train_state  # noqa: E402
from megatron_save.trainers.stage3.batches import prompts_per_rank, response_group_batches  # noqa: E402
from megatron_save.trainers.stage3.config import RewardSettings  # noqa: E402
from megatron_save.trainers.stage3.groups import partition_feedback, prepare_groups, score_groups  # noqa: E402
from megatron_save.trainers.stage3.reward_phase import update_reward_model  # noqa: E402
from megatron_save.trainers.step import train_step  # noqa: E402
from megatron_save.trainers.strategies import STRATEGIES  # noqa: E402

# (strategy, mu): mu = 0.5 keeps every response; 0.999 keeps none (an empty B~: a value-only SAVE update).
CASES = {"save": ("save", 0.5), "save_value_only": ("save", 0.999), "mean_reward": ("mean_reward", 0.5),
         "hl_bt": ("hl_bt", 0.5)}
MICRO_BATCH = 1


@dataclass
class OracleBatch(ResponseGroupBatch):
    """A micro-batch of the three-pass reference: the partition made beforehand, and the counts' scales."""

    pos_mask: torch.Tensor = None
    """[N] bool, Y+ by the scoring pass's partition."""
    neg_mask: torch.Tensor = None
    """[N] bool, Y- by it."""
    reward_scale: float = 0.0
    """(micro-batches x ranks) / the batch's reward count, known before the pass."""


def oracle_loss(kind: str, batch: OracleBatch, scores: torch.Tensor):
    """Eqs. 18-21 (and the baselines) on the precomputed partition, normalised by the precomputed counts."""
    rows = torch.arange(scores.shape[0])
    rewards = at_last_token(scores, batch.attention_mask)[:, 0].view(-1, batch.group_size)
    values = scores[rows, batch.prompt_lengths - 1, 1].view(-1, batch.group_size)[:, 0]
    trained = batch.trained.view(-1, batch.group_size)
    pos, neg = batch.pos_mask.view(-1, batch.group_size), batch.neg_mask.view(-1, batch.group_size)
    keep = pos.any(1) & neg.any(1)
    if kind == "hl_bt":
        count = highest_lowest_pairs(rewards, trained)[2].sum()
        loss = batch.reward_scale * hl_bt_loss(rewards, trained) * count
        return loss, {"loss": loss}
    anchor = values if kind == "save" else mean_reward_anchor(rewards, trained)
    loss = batch.reward_scale * save_reward_loss(rewards, anchor, pos, neg, keep) * keep.sum()
    if kind == "save":
        loss = loss + batch.value_scale * value_anchor_loss(values, rewards, trained) * trained.any(1).sum()
    return loss, {"loss": loss}


def three_pass(state, model, kind, groups, threshold):
    strategy = STRATEGIES[kind]
    scores = score_groups(model, groups, pad_id=0, micro_batch_size=4)
    partition = partition_feedback(strategy, scores, groups.valid, threshold)
    if kind == "hl_bt":
        reward_count = int(highest_lowest_pairs(scores.rewards.nan_to_num(0.0), groups.valid)[2].sum())
    else:
        reward_count = int(partition.prompt_keep.sum())
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    batches = response_group_batches(groups, groups.valid, threshold, MICRO_BATCH, 0, ranks, rank)
    per_rank = prompts_per_rank(groups.valid.shape[0], ranks, MICRO_BATCH)

    def slots(mask):  # [B, G] -> this rank's [per_rank * G], padded prompts False
        padded = torch.zeros(per_rank * ranks, mask.shape[1], dtype=torch.bool)
        padded[: mask.shape[0]] = mask
        return padded[rank * per_rank : (rank + 1) * per_rank].flatten()

    pos, neg = slots(partition.pos_mask), slots(partition.neg_mask)
    width = MICRO_BATCH * groups.group_size
    total = len(batches) * ranks
    oracle_batches = [OracleBatch(**{f: getattr(b, f) for f in b.__dataclass_fields__},
                                  pos_mask=pos[i * width : (i + 1) * width], neg_mask=neg[i * width : (i + 1) * width],
                                  reward_scale=total / reward_count if reward_count else 0.0)
                      for i, b in enumerate(batches)]
    loss_fn = partial(oracle_loss, kind)
    if reward_count == 0:
        with backbone_frozen(state):
            metrics = train_step(state, oracle_batches, loss_fn, ("loss",))
    else:
        metrics = train_step(state, oracle_batches, loss_fn, ("loss",))
    return scores, partition, reward_count, metrics


def run_case(args, tokenizer, kind, threshold):
    prompts, rollouts = fixed_rollouts(tokenizer)
    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=128, drop_truncated=False)
    settings = RewardSettings(checkpoint=args.reward, strategy=kind, micro_batch_size=MICRO_BATCH,
                              optim=OptimizerSettings(lr=1e-3, value_head_lr=1e-2, decay_style="constant"))
    fused_model, _, _ = build_model_from_checkpoint(args.reward)
    oracle_model, _, _ = build_model_from_checkpoint(args.reward)
    initial = [p.detach().clone() for p in oracle_model.parameters()]
    fused_state = build_train_state(fused_model, settings.optim, total_steps=1)
    oracle_state = build_train_state(oracle_model, settings.optim, total_steps=1)
    update = update_reward_model(fused_state, STRATEGIES[kind], settings, groups, groups.valid, threshold, 0, True)
    scores, partition, reward_count, oracle_metrics = three_pass(oracle_state, oracle_model, kind, groups, threshold)
    fused_partition = partition_feedback(STRATEGIES[kind], update.scores, groups.valid, threshold)
    diff = 0.0
    value_head_change = backbone_change = 0.0
    for (name, fused), oracle, start in zip(fused_model.named_parameters(), oracle_model.parameters(), initial):
        diff = max(diff, ((fused - oracle).abs().max() / oracle.abs().max().clamp(min=1e-12)).item())
        moved = (oracle - start).abs().max().item()
        if "value_head" in name:
            value_head_change = max(value_head_change, moved)
        else:
            backbone_change = max(backbone_change, moved)
    stats = torch.tensor([diff, value_head_change, backbone_change])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    rescored_fused = score_groups(fused_model, groups, pad_id=0, micro_batch_size=4)
    rescored_oracle = score_groups(oracle_model, groups, pad_id=0, micro_batch_size=4)
    valid = groups.valid
    return {
        "fused": {"rewards": update.scores.rewards[valid].tolist(), "values": update.scores.values.tolist(),
                  "pos": fused_partition.pos_mask.flatten().tolist(), "neg": fused_partition.neg_mask.flatten().tolist(),
                  "reward_count": update.reward_count, "grad_norm": update.metrics.get("rm/grad_norm"),
                  "stepped": update.stepped, "rescored": rescored_fused.rewards[valid].tolist(),
                  "rescored_values": rescored_fused.values.tolist()},
        "oracle": {"rewards": scores.rewards[valid].tolist(), "values": scores.values.tolist(),
                   "pos": partition.pos_mask.flatten().tolist(), "neg": partition.neg_mask.flatten().tolist(),
                   "reward_count": reward_count, "grad_norm": oracle_metrics["grad_norm"],
                   "rescored": rescored_oracle.rewards[valid].tolist(),
                   "rescored_values": rescored_oracle.values.tolist()},
        "param_rel_diff": stats[0].item(), "value_head_change": stats[1].item(), "backbone_change": stats[2].item(),
    }


def main() -> None:
    run_every_layout(lambda args, tokenizer: {case: run_case(args, tokenizer, kind, threshold)
                                              for case, (kind, threshold) in CASES.items()})


if __name__ == "__main__":
    main()
