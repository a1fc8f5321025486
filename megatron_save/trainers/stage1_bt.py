"""Stage 1: Bradley-Terry reward-model training on preference pairs (paper eq. 11).

    torchrun --nproc-per-node N -m megatron_save stage1 CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial

from omegaconf import MISSING

from megatron_save.checkpoint import save_model_checkpoint
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.checkpoint.train_checkpoint import load_train_checkpoint, save_train_checkpoint
from megatron_save.config import MemoryCheckSettings, ParallelConfig, RecomputeSettings
from megatron_save.data.batching import pad_id_of
from megatron_save.data.preference import load_preference_pairs
from megatron_save.trainers.common import (
    BatchSettings,
    DataSettings,
    check_settings,
    ensure_output_dir,
    epoch_batches,
    load_examples,
    pair_micro_batches,
    pairwise_eval,
    progress,
    run_from_command_line,
    start_from_checkpoint,
    write_json,
)
from megatron_save.trainers.losses import bt_pair_loss
from megatron_save.trainers.memory_check import check_training_memory
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state
from megatron_save.trainers.step import train_step
from megatron_save.utils.logging import get_logger

logger = get_logger("trainers.stage1_bt")


@dataclass
class Stage1Config:
    """A Bradley-Terry run."""

    checkpoint: str = MISSING
    """Reward-model checkpoint to start from (made by tools/convert_hf_to_megatron.py)."""
    output_dir: str = MISSING
    """Where the trained checkpoint and metrics.json go."""
    data: DataSettings = field(default_factory=DataSettings)
    """Preference pairs, rows of {"prompt", "chosen", "rejected"}, and the held-out ones for the accuracy."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only before and after training)."""
    save_every: int = 0
    """Write a training checkpoint (model, optimizer, schedule) to output_dir/checkpoints/step_N every N steps."""
    resume_from: str | None = None
    """A training checkpoint of this run to continue from (same data and batch settings)."""
    batch: BatchSettings = field(default_factory=BatchSettings)
    """Batch sizes in pairs, epochs, data-order seed."""
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel layout."""
    recompute: RecomputeSettings = field(default_factory=RecomputeSettings)
    """Activation recompute of the reward model's training forwards (see docs/guides/recompute_and_token_budgets.md)."""
    memory_check: MemoryCheckSettings = field(default_factory=MemoryCheckSettings)
    """The planned per-GPU peak against the device before any model is built (docs/guides/scaling.md)."""


def train_stage1(cfg: Stage1Config) -> dict:
    check_settings(cfg)
    # pairs: chosen + rejected, kept together by a token budget
    check_training_memory(cfg, "stage 1", sequences=2 * cfg.batch.micro_batch_size, rows_per_example=2)
    model, meta, tokenizer = start_from_checkpoint(cfg.checkpoint, cfg.parallel, recompute=cfg.recompute)
    ensure_output_dir(cfg.output_dir, resuming=cfg.resume_from is not None)
    pad_id = pad_id_of(tokenizer)
    train_pairs, eval_pairs = load_examples(cfg.data, load_preference_pairs, tokenizer)
    batches = epoch_batches([p.length for p in train_pairs], cfg.batch, cfg.data.train_data, "pairs")
    state = build_train_state(model, cfg.optim, total_steps=len(batches))
    start = load_train_checkpoint(state, cfg.resume_from) if cfg.resume_from else 0
    evaluate = partial(pairwise_eval, model, eval_pairs, 2 * cfg.batch.micro_batch_size, pad_id)

    history = {"eval_accuracy": [(start, evaluate())], "train": []}
    logger.info("%d training pairs, %d held out, steps %d..%d; held-out accuracy %.3f", len(train_pairs),
                len(eval_pairs), start + 1, len(batches), history["eval_accuracy"][0][1])
    bar = progress(len(batches), "stage 1 (BT)")
    bar.update(start)
    for step, indices in enumerate(batches[start:], start=start + 1):
        micro_batches = pair_micro_batches(train_pairs, indices, cfg.batch, pad_id)
        metrics = train_step(state, micro_batches, bt_pair_loss, ("loss", "accuracy"))
        history["train"].append({"step": step, **metrics})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
        bar.update()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < len(batches):
            history["eval_accuracy"].append((step, evaluate()))
        if cfg.save_every and step % cfg.save_every == 0:
            save_train_checkpoint(state, f"{cfg.output_dir}/checkpoints/step_{step}", step)
    bar.close()
    history["eval_accuracy"].append((len(batches), evaluate()))
    logger.info("held-out accuracy after %d steps: %.3f", len(batches), history["eval_accuracy"][-1][1])

    save_model_checkpoint(state.module, cfg.output_dir, meta, f"{cfg.checkpoint}/{HF_SUBDIR}")
    write_json(f"{cfg.output_dir}/metrics.json", history)
    return history


def main(argv: list[str]) -> None:
    """``torchrun ... -m megatron_save stage1 CONFIG.yaml [MORE.yaml ...] [key=value ...]``."""
    run_from_command_line(Stage1Config, train_stage1, "stage1", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
