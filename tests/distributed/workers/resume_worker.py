"""torchrun worker (2 ranks): train 4 steps straight at TP=2, and 2 steps + save + load at PP=2 + 2 steps, with
the plain and with the distributed optimizer.

Writes {"plain": {"straight": ..., "resumed": ..., "lrs_saved": ..., "lrs_loaded": ...}, "distributed": ...}
(or {"refused": message} for an optimizer whose state cannot be resumed) to --out.
"""

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_save.checkpoint import build_model_from_checkpoint  # noqa: E402
from megatron_save.checkpoint.train_checkpoint import (  # noqa: E402
    UnsupportedResumeError,
    load_train_checkpoint,
    save_train_checkpoint,
)
from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.data.preference import load_preference_pairs  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402
from megatron_save.models.forward import score_sequences  # noqa: E402
from megatron_save.trainers.common import BatchSettings  # noqa: E402
from megatron_save.trainers.losses import bt_pair_loss  # noqa: E402
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state, group_learning_rates  # noqa: E402
from megatron_save.trainers.common import pair_micro_batches  # noqa: E402
from megatron_save.trainers.step import train_step  # noqa: E402
from megatron_save.utils.tensors import pad_rows  # noqa: E402

STEPS, PAIRS = 4, 4


def fresh_state(ckpt, distributed_optimizer):
    settings = OptimizerSettings(lr=1e-3, value_head_lr=3e-2, warmup_steps=1, decay_style="linear",
                                 min_lr_ratio=0.1, use_distributed_optimizer=distributed_optimizer)
    model, _, _ = build_model_from_checkpoint(ckpt)
    return build_train_state(model, settings, total_steps=STEPS)


def steps(state, pairs, first, last):
    batch = BatchSettings(global_batch_size=PAIRS, micro_batch_size=1)
    return [train_step(state, pair_micro_batches(pairs, list(range(s * PAIRS, (s + 1) * PAIRS)), batch, 0),
                       bt_pair_loss, ("loss",))["loss"] for s in range(first, last)]


def rewards_on(state, pairs):
    input_ids, mask = pad_rows([p.chosen_ids for p in pairs[:4]], 0)
    return score_sequences(state.module, input_ids, mask, micro_batch_size=2).rewards.tolist()


def resume_run(ckpt, pairs, save_dir, distributed_optimizer) -> dict:
    """Both runs with one optimizer kind; returns their losses, rewards and group learning rates."""
    set_model_parallel(ParallelConfig(tensor_model_parallel_size=2))
    straight = fresh_state(ckpt, distributed_optimizer)
    straight_losses = steps(straight, pairs, 0, STEPS)
    straight_rewards = rewards_on(straight, pairs)

    first = fresh_state(ckpt, distributed_optimizer)
    losses = steps(first, pairs, 0, 2)
    save_train_checkpoint(first, save_dir, step=2)
    lrs_saved = group_learning_rates(first)
    set_model_parallel(ParallelConfig(tensor_model_parallel_size=1, pipeline_model_parallel_size=2))
    resumed = fresh_state(ckpt, distributed_optimizer)
    try:
        step = load_train_checkpoint(resumed, save_dir)
    except UnsupportedResumeError as error:
        return {"refused": str(error)}
    lrs_loaded = group_learning_rates(resumed)
    losses += steps(resumed, pairs, step, STEPS)
    return {"straight": straight_losses, "resumed": losses, "lrs_saved": lrs_saved, "lrs_loaded": lrs_loaded,
            "step": step, "straight_rewards": straight_rewards, "resumed_rewards": rewards_on(resumed, pairs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    pairs, _ = load_preference_pairs(args.pairs, AutoTokenizer.from_pretrained(Path(args.ckpt) / "hf"), 128)
    results = {kind: resume_run(args.ckpt, pairs, Path(args.save_dir) / kind, kind == "distributed")
               for kind in ("plain", "distributed")}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    main()
