"""Supervised fine-tuning of a causal LM on demonstrations (next-token loss on the response tokens): the initial
policy of an RL run.

    torchrun --nproc-per-node N -m megatron_save sft CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from omegaconf import MISSING

from megatron_save.checkpoint import save_model_checkpoint
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.config import MemoryCheckSettings, ParallelConfig, RecomputeSettings
from megatron_save.data.batching import DemonstrationBatch, pad_id_of
from megatron_save.data.demonstrations import Demonstration, load_demonstrations
from megatron_save.models.policy import sequence_logprobs, token_logprobs
from megatron_save.trainers.common import (
    BATCH_BUDGET,
    BatchSettings,
    DataSettings,
    budget_micro_batches,
    check_settings,
    data_parallel_shares,
    ensure_output_dir,
    epoch_batches,
    load_examples,
    progress,
    run_from_command_line,
    start_from_checkpoint,
    write_json,
)
from megatron_save.trainers.memory_check import check_training_memory
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state
from megatron_save.trainers.step import train_step
from megatron_save.utils.logging import get_logger
from megatron_save.utils.tensors import pad_rows

logger = get_logger("trainers.sft")


@dataclass
class SFTConfig:
    """A supervised fine-tuning run."""

    checkpoint: str = MISSING
    """Causal-LM checkpoint to start from (made by tools/convert_hf_to_megatron.py)."""
    output_dir: str = MISSING
    """Where the trained checkpoint and metrics.json go."""
    data: DataSettings = field(default_factory=DataSettings)
    """Demonstrations, rows of {"prompt", "response"}, and the held-out ones for the held-out loss."""
    batch: BatchSettings = field(default_factory=BatchSettings)
    """Batch sizes in demonstrations, epochs, data-order seed."""
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel layout."""
    recompute: RecomputeSettings = field(default_factory=RecomputeSettings)
    """Activation recompute of the model's training forwards (see docs/guides/recompute_and_token_budgets.md)."""
    memory_check: MemoryCheckSettings = field(default_factory=MemoryCheckSettings)
    """The planned per-GPU peak against the device before any model is built (docs/guides/scaling.md)."""


def response_loss_mask(demonstrations: list[Demonstration], width: int) -> torch.Tensor:
    """[N, width - 1] bool in the shifted frame: position t is True when token t + 1 is a response token."""
    mask = torch.zeros(len(demonstrations), width - 1, dtype=torch.bool)
    for row, demo in enumerate(demonstrations):
        mask[row, demo.prompt_length - 1 : len(demo.ids) - 1] = True
    return mask


def demonstration_batch(demonstrations: list[Demonstration], pad_id: int, width: int | None = None
                        ) -> DemonstrationBatch:
    """Right-padded rows with their response-token loss mask."""
    input_ids, attention_mask = pad_rows([d.ids for d in demonstrations], pad_id, width)
    return DemonstrationBatch(input_ids, attention_mask, response_loss_mask(demonstrations, input_ids.shape[1]))


def sft_loss(batch: DemonstrationBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean negative log-likelihood of the micro-batch's response tokens. logits: [b, S, V / TP]."""
    logp = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:])  # [b, S - 1]
    mask = batch.loss_mask.float()
    # A token-budget micro-batch's scale makes its token mean its share of the global batch's token mean.
    loss = batch.loss_scale * -(logp * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"loss": loss}


def demonstration_micro_batches(demonstrations: list[Demonstration], indices: list[int], settings: BatchSettings,
                                pad_id: int) -> list[DemonstrationBatch]:
    """This rank's micro-batches of a global batch: ``micro_batch_size`` rows each, padded to the global batch's
    longest row (the loss: the mean over micro-batches of each one's response-token mean), or with
    ``max_tokens_per_micro_batch`` token-budget micro-batches whose loss scales make the loss the global batch's
    response-token mean (what the fixed micro-batches give when they hold equal response tokens)."""
    width = max(len(demonstrations[i].ids) for i in indices)
    shares = data_parallel_shares(indices, settings)
    batch = demonstration_batch([demonstrations[i] for i in shares[parallel_state.get_data_parallel_rank()]],
                                pad_id, width)
    if not settings.max_tokens_per_micro_batch:
        return batch.split(settings.micro_batch_size)
    return budget_micro_batches(
        batch, 1, [[len(demonstrations[i].ids) for i in share] for share in shares],
        [[float(len(demonstrations[i].ids) - demonstrations[i].prompt_length) for i in share] for share in shares],
        settings.max_tokens_per_micro_batch, BATCH_BUDGET)


def held_out_loss(model, demonstrations: list[Demonstration], pad_id: int, micro_batch_size: int) -> float:
    """Mean response-token NLL over every held-out demonstration, the same on every rank."""
    batch = demonstration_batch(demonstrations, pad_id)
    # The forward takes whole micro-batches: the largest size up to micro_batch_size that divides the rows.
    logp = sequence_logprobs(model, batch.input_ids, math.gcd(len(demonstrations), micro_batch_size)).logp.cpu()
    mask = batch.loss_mask.float()
    return float(-(logp * mask).sum() / mask.sum())


def train_sft(cfg: SFTConfig) -> dict:
    check_settings(cfg)
    check_training_memory(cfg, "SFT", sequences=cfg.batch.micro_batch_size)
    model, meta, tokenizer = start_from_checkpoint(cfg.checkpoint, cfg.parallel, recompute=cfg.recompute)
    if meta.kind != "causal_lm":
        raise ValueError(f"{cfg.checkpoint}: holds a {meta.kind}; supervised fine-tuning needs a causal_lm")
    ensure_output_dir(cfg.output_dir, resuming=False)
    pad_id = pad_id_of(tokenizer)
    train, held_out = load_examples(cfg.data, load_demonstrations, tokenizer)
    batches = epoch_batches([len(d.ids) for d in train], cfg.batch, cfg.data.train_data, "demonstrations")
    state = build_train_state(model, cfg.optim, total_steps=len(batches))
    evaluate = lambda: held_out_loss(model, held_out, pad_id, cfg.batch.micro_batch_size)  # noqa: E731

    history = {"eval_loss": [(0, evaluate())], "train": []}
    logger.info("%d demonstrations, %d held out, %d steps; held-out loss %.4f", len(train), len(held_out),
                len(batches), history["eval_loss"][0][1])
    bar = progress(len(batches), "SFT")
    for step, indices in enumerate(batches, start=1):
        micro_batches = demonstration_micro_batches(train, indices, cfg.batch, pad_id)
        metrics = train_step(state, micro_batches, sft_loss, ("loss",))
        history["train"].append({"step": step, **metrics})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        bar.update()
    bar.close()
    history["eval_loss"].append((len(batches), evaluate()))
    logger.info("held-out loss after %d steps: %.4f", len(batches), history["eval_loss"][-1][1])
    save_model_checkpoint(state.module, cfg.output_dir, meta, f"{cfg.checkpoint}/{HF_SUBDIR}")
    write_json(f"{cfg.output_dir}/metrics.json", history)
    return history


def main(argv: list[str]) -> None:
    """``torchrun ... -m megatron_save sft CONFIG.yaml [MORE.yaml ...] [key=value ...]``."""
    run_from_command_line(SFTConfig, train_sft, "sft", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
