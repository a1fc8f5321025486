"""Stage 2: value-anchor integration (paper eq. 12). The reward model is frozen; only the value head learns
to predict, from the prompt alone, the mean frozen-RM reward of K sampled responses.

    torchrun --nproc-per-node N -m megatron_save stage2 CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from omegaconf import MISSING

from megatron_save.checkpoint import save_model_checkpoint
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.config import MemoryCheckSettings, ParallelConfig, RecomputeSettings
from megatron_save.data.batching import PromptTargetBatch, pad_id_of
from megatron_save.data.response_groups import ResponseGroup, load_response_groups
from megatron_save.models.forward import score_token_sequences
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
from megatron_save.trainers.losses import value_regression_loss
from megatron_save.trainers.memory_check import check_training_memory
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state
from megatron_save.trainers.step import train_step
from megatron_save.utils.logging import get_logger
from megatron_save.utils.tensors import pad_rows

logger = get_logger("trainers.stage2_value")
# Held-out prompts a correlation needs to mean anything: with 2 every non-constant pair correlates at +-1.
MIN_CORRELATION_PROMPTS = 5


@dataclass
class Stage2Config:
    """A value-anchor run (paper Table 8: K = 16, value-head LR 2e-4, batch 32, one epoch)."""

    checkpoint: str = MISSING
    """Stage-1 reward model; a value head is added (zero-initialised) when it has none."""
    output_dir: str = MISSING
    """Where the checkpoint with the fitted value head and metrics.json go."""
    data: DataSettings = field(default_factory=lambda: DataSettings(eval_fraction=0.1))
    """Rows of {"prompt", "responses": [K strings]} sampled from the policy (a response whose conversation is
    longer than max_length is skipped), and the held-out prompts (by default 10%) for the value report."""
    score_micro_batch_size: int = 8
    """Sequences per forward pass when scoring responses with the frozen reward model."""
    batch: BatchSettings = field(default_factory=lambda: BatchSettings(global_batch_size=32, micro_batch_size=4))
    """Batch sizes in prompts, epochs, data-order seed."""
    optim: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(value_head_lr=2e-4))
    """Optimizer of the value head (``lr`` is ignored: the backbone and reward head are frozen)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel layout."""
    recompute: RecomputeSettings = field(default_factory=RecomputeSettings)
    """Activation recompute of the training forwards; it saves memory at PP > 1 only, where the frozen backbone
    still runs its backward (at PP = 1 only the value head keeps activations for one)."""
    memory_check: MemoryCheckSettings = field(default_factory=MemoryCheckSettings)
    """The planned per-GPU peak against the device before any model is built (docs/guides/scaling.md)."""


def mean_frozen_rewards(model, groups: list[ResponseGroup], micro_batch_size: int, pad_id: int) -> torch.Tensor:
    """[P] mean reward of each prompt's responses under the frozen reward model (every rank)."""
    sequences = [ids for g in groups for ids in g.sequence_ids]
    rewards = score_token_sequences(model, sequences, pad_id, micro_batch_size, description="scoring responses")
    return torch.stack([r.mean() for r in rewards.rewards.split([len(g.sequence_ids) for g in groups])])


def value_correlation(values: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Pearson correlation of V(x) [P] with the mean frozen rewards [P]; None from fewer than
    MIN_CORRELATION_PROMPTS prompts, and while V or the targets are constant (e.g. a zero-initialised head), where
    it is undefined."""
    if len(values) < MIN_CORRELATION_PROMPTS or not (values.std() > 0 and targets.std() > 0):
        return None
    return torch.corrcoef(torch.stack([values.float(), targets.float()]))[0, 1].item()


def too_few_prompts_warning(count: int) -> str | None:
    """Why the report has no held-out correlation from ``count`` prompts, naming the settings to change; None when
    there are enough."""
    if count >= MIN_CORRELATION_PROMPTS:
        return None
    return (f"only {count} held-out prompts: value_correlation needs at least {MIN_CORRELATION_PROMPTS} and is "
            "reported as null; raise data.eval_fraction or set data.eval_data to more prompts")


def value_report(model, groups: list[ResponseGroup], targets: torch.Tensor, micro_batch_size: int,
                 pad_id: int) -> dict[str, float | int | None]:
    """Held-out value MSE and Pearson correlation of V(x) with the mean frozen reward (:func:`value_correlation`),
    with the number of held-out prompts they come from."""
    prompts = [g.prompt_ids for g in groups]
    values = score_token_sequences(model, prompts, pad_id, micro_batch_size, [len(p) for p in prompts],
                                   description="held-out values").values
    return {"value_mse": torch.mean((values - targets) ** 2).item(),
            "value_correlation": value_correlation(values, targets), "eval_prompts": len(groups)}


def prompt_micro_batches(groups: list[ResponseGroup], targets: torch.Tensor, indices: list[int],
                         settings: BatchSettings, pad_id: int) -> list[PromptTargetBatch]:
    """This rank's micro-batches of prompts: ``micro_batch_size`` each, padded to the global batch's longest prompt,
    or with ``max_tokens_per_micro_batch`` token-budget micro-batches with loss scales that keep the mean over the
    global batch's prompts."""
    length = max(len(groups[i].prompt_ids) for i in indices)
    shares = data_parallel_shares(indices, settings)
    mine = shares[parallel_state.get_data_parallel_rank()]
    input_ids, mask = pad_rows([groups[i].prompt_ids for i in mine], pad_id, length)
    batch = PromptTargetBatch(input_ids, mask, targets[mine])
    if not settings.max_tokens_per_micro_batch:
        return batch.split(settings.micro_batch_size)
    return budget_micro_batches(batch, 1, [[len(groups[i].prompt_ids) for i in share] for share in shares],
                                [[1.0] * len(share) for share in shares], settings.max_tokens_per_micro_batch,
                                BATCH_BUDGET)


def train_stage2(cfg: Stage2Config) -> dict:
    check_settings(cfg)
    # Only the value head learns; the scoring forward reads score_micro_batch_size responses at once.
    check_training_memory(cfg, "stage 2", max(cfg.batch.micro_batch_size, cfg.score_micro_batch_size),
                          backbone_trained=False)
    model, meta, tokenizer = start_from_checkpoint(cfg.checkpoint, cfg.parallel, add_value_head=True,
                                                  recompute=cfg.recompute)
    ensure_output_dir(cfg.output_dir, resuming=False)
    pad_id = pad_id_of(tokenizer)
    groups, eval_groups = load_examples(cfg.data, load_response_groups, tokenizer)
    targets = mean_frozen_rewards(model, groups, cfg.score_micro_batch_size, pad_id)
    eval_targets = mean_frozen_rewards(model, eval_groups, cfg.score_micro_batch_size, pad_id)
    warning = too_few_prompts_warning(len(eval_groups))
    if warning is not None:
        logger.warning(warning)

    batches = epoch_batches([len(g.prompt_ids) for g in groups], cfg.batch, cfg.data.train_data, "prompts")
    state = build_train_state(model, cfg.optim, total_steps=len(batches), freeze_all_but_value_head=True)
    history = {"eval": [{"step": 0, **value_report(model, eval_groups, eval_targets, cfg.batch.micro_batch_size,
                                                   pad_id)}]}
    logger.info("%d prompts (%d held out), %d steps; before: %s", len(groups), len(eval_groups), len(batches),
                history["eval"][0])
    bar = progress(len(batches), "stage 2 (value anchor)")
    for step, indices in enumerate(batches, start=1):
        micro_batches = prompt_micro_batches(groups, targets, indices, cfg.batch, pad_id)
        metrics = train_step(state, micro_batches, value_regression_loss, ("loss",))
        history.setdefault("train", []).append({"step": step, **metrics})
        bar.set_postfix(mse=f"{metrics['loss']:.4f}")
        bar.update()
    bar.close()
    history["eval"].append({"step": len(batches), **value_report(
        model, eval_groups, eval_targets, cfg.batch.micro_batch_size, pad_id)})
    logger.info("after %d steps: %s", len(batches), history["eval"][-1])

    save_model_checkpoint(state.module, cfg.output_dir, meta, f"{cfg.checkpoint}/{HF_SUBDIR}")
    write_json(f"{cfg.output_dir}/metrics.json", history)
    return history


def main(argv: list[str]) -> None:
    """``torchrun ... -m megatron_save stage2 CONFIG.yaml [MORE.yaml ...] [key=value ...]``."""
    run_from_command_line(Stage2Config, train_stage2, "stage2", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
