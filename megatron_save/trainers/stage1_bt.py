"""Stage 1: Bradley-Terry reward-model training on preference pairs (paper eq. 11).

    torchrun --nproc-per-node N -m megatron_save.trainers.stage1_bt CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from omegaconf import MISSING

from megatron_save.algorithms import pairwise_accuracy
from megatron_save.checkpoint import save_model_checkpoint
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.config import ParallelConfig, load_config
from megatron_save.data.batching import PairBatch, length_grouped_batches, pad_rows
from megatron_save.data.preference import PreferencePair, load_preference_pairs
from megatron_save.distributed import shutdown_distributed
from megatron_save.models.forward import score_sequences
from megatron_save.trainers.common import BatchSettings, data_parallel_part, progress, start_from_checkpoint, write_json
from megatron_save.trainers.losses import bt_pair_loss
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
    train_data: str = MISSING
    """Preference pairs: a json / jsonl / parquet file, or a hub dataset name."""
    eval_data: str | None = None
    """Held-out pairs; when unset, ``eval_fraction`` of train_data is held out."""
    eval_fraction: float = 0.05
    """Share of train_data held out when eval_data is unset."""
    split: str = "train"
    """Split of a hub dataset."""
    max_length: int = 2048
    """Pairs with a longer conversation are skipped (and counted)."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only before and after training)."""
    batch: BatchSettings = field(default_factory=BatchSettings)
    """Batch sizes in pairs, epochs, data-order seed."""
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel layout."""


def pair_micro_batches(pairs: list[PreferencePair], indices: list[int], settings: BatchSettings,
                       pad_id: int) -> list[PairBatch]:
    """This rank's micro-batches of a global batch, all padded to the global batch's longest sequence."""
    length = max(pairs[i].length for i in indices)
    rows = [ids for i in data_parallel_part(indices, settings) for ids in (pairs[i].chosen_ids, pairs[i].rejected_ids)]
    return PairBatch(*pad_rows(rows, pad_id, length)).split(2 * settings.micro_batch_size)


def pairwise_eval(model, pairs: list[PreferencePair], micro_batch_size: int, pad_id: int) -> float:
    """Held-out accuracy over every pair (chosen strictly above rejected), computed on every rank."""
    correct = 0
    for start in range(0, len(pairs), micro_batch_size):
        chunk = pairs[start : start + micro_batch_size]
        input_ids, mask = pad_rows([ids for p in chunk for ids in (p.chosen_ids, p.rejected_ids)], pad_id)
        rewards = score_sequences(model, input_ids, mask, micro_batch_size=2 * len(chunk)).rewards
        correct += pairwise_accuracy(rewards[0::2], rewards[1::2]).item() * len(chunk)
    return correct / max(len(pairs), 1)


def train_stage1(cfg: Stage1Config) -> dict:
    model, meta, tokenizer = start_from_checkpoint(cfg.checkpoint, cfg.parallel)
    train_pairs, _ = load_preference_pairs(cfg.train_data, tokenizer, cfg.max_length, cfg.split)
    if cfg.eval_data:
        eval_pairs, _ = load_preference_pairs(cfg.eval_data, tokenizer, cfg.max_length, cfg.split)
    else:
        held_out = int(len(train_pairs) * cfg.eval_fraction)
        train_pairs, eval_pairs = train_pairs[held_out:], train_pairs[:held_out]
    batches = [b for epoch in range(cfg.batch.epochs) for b in length_grouped_batches(
        [p.length for p in train_pairs], cfg.batch.global_batch_size, seed=cfg.batch.seed + epoch)]
    if not batches:
        raise ValueError(f"{cfg.train_data}: {len(train_pairs)} pairs make no batch of {cfg.batch.global_batch_size}")
    state = build_train_state(model, cfg.optim, total_steps=len(batches))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    history = {"eval_accuracy": [(0, pairwise_eval(model, eval_pairs, cfg.batch.micro_batch_size, pad_id))]}
    logger.info("%d training pairs, %d held out, %d steps; held-out accuracy before training %.3f",
                len(train_pairs), len(eval_pairs), len(batches), history["eval_accuracy"][0][1])
    bar = progress(len(batches), "stage 1 (BT)")
    for step, indices in enumerate(batches, start=1):
        micro_batches = pair_micro_batches(train_pairs, indices, cfg.batch, pad_id)
        metrics = train_step(state, micro_batches, bt_pair_loss, ("loss", "accuracy"))
        history.setdefault("train", []).append({"step": step, **metrics})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
        bar.update()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < len(batches):
            history["eval_accuracy"].append((step, pairwise_eval(model, eval_pairs, cfg.batch.micro_batch_size, pad_id)))
    bar.close()
    history["eval_accuracy"].append((len(batches), pairwise_eval(model, eval_pairs, cfg.batch.micro_batch_size, pad_id)))
    logger.info("held-out accuracy after %d steps: %.3f", len(batches), history["eval_accuracy"][-1][1])

    save_model_checkpoint(state.module, cfg.output_dir, meta, f"{cfg.checkpoint}/{HF_SUBDIR}")
    write_json(f"{cfg.output_dir}/metrics.json", history)
    return history


def main(argv: list[str]) -> None:
    if not argv or "=" in argv[0]:
        raise SystemExit("usage: python -m megatron_save.trainers.stage1_bt CONFIG.yaml [key=value ...]")
    train_stage1(load_config(Stage1Config, argv[0], argv[1:]))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
