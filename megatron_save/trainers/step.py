"""One optimizer step through Megatron's pipeline schedule, and forward-only evaluation, for scalar-head models."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_save.data.batching import TokenBatch
from megatron_save.distributed import compute_device
from megatron_save.models.forward import (
    broadcast_from_last_stage,
    run_model,
    sequence_parallel_length,
    varying_lengths,
)
from megatron_save.models.train_state import TrainState

# (micro-batch, per-token head outputs [b, S, heads]) -> (loss, metrics of that micro-batch)
LossFn = Callable[[TokenBatch, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _forward_step(loss_fn: LossFn, data_iterator, model):
    batch = next(data_iterator).to(compute_device())
    scores = run_model(model, batch.input_ids, batch.position_ids())  # [b, S, heads] on the last stage

    def loss_func(output):
        loss, metrics = loss_fn(batch, output)
        # Cloned: the schedule divides the returned loss in place by the number of micro-batches.
        return loss, {name: value.detach().float().clone() for name, value in metrics.items()}

    return scores, loss_func


def _mean_metrics(per_micro_batch: list[dict[str, torch.Tensor]], names: Sequence[str]) -> dict[str, float]:
    """Means over micro-batches and data-parallel ranks, on every rank."""
    values = None
    if parallel_state.is_pipeline_last_stage():
        values = torch.stack([torch.stack([m[n] for m in per_micro_batch]).mean() for n in names])
    values = broadcast_from_last_stage(values, (len(names),), torch.float32)
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    values /= parallel_state.get_data_parallel_world_size()
    return dict(zip(names, values.tolist()))


def forward_backward(state: TrainState, micro_batches: list[TokenBatch], loss_fn: LossFn,
                     forward_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """Forward + backward over this data-parallel rank's micro-batches through the pipeline schedule, gradients
    reduced over data-parallel ranks into the grad buffers (the mean of the micro-batch losses, averaged over
    ranks). Returns each micro-batch's metrics on the last pipeline stage ([] on other stages).

    Micro-batches may differ in rows and length (token-budget micro-batches: under PP the schedule then sends
    each activation's shape first). ``forward_only``: the forward and the loss function's metrics alone (in train
    mode, without gradients), the grad buffers left as they are."""
    state.model.train()
    if not forward_only:
        state.model.zero_grad_buffer()
        state.optimizer.zero_grad()
    lengths = [sequence_parallel_length(m.input_ids.shape[1], state.model.config) for m in micro_batches]
    shapes = [(m.input_ids.shape[0], n) for m, n in zip(micro_batches, lengths)]
    with varying_lengths(state.model.config, shapes), torch.set_grad_enabled(not forward_only):
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss_fn),
            data_iterator=iter(micro_batches),
            model=[state.model],
            num_microbatches=len(micro_batches),
            seq_length=max(lengths),
            micro_batch_size=max(m.input_ids.shape[0] for m in micro_batches),
            forward_only=forward_only,
        )


def optimizer_step(state: TrainState) -> dict[str, float]:
    """One optimizer and LR step on the reduced gradients: ``grad_norm`` and ``update_skipped``."""
    update_successful, grad_norm, _ = state.optimizer.step()
    state.scheduler.step(1)
    return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_skipped": float(not update_successful)}


def train_step(state: TrainState, micro_batches: list[TokenBatch], loss_fn: LossFn,
               metric_names: Sequence[str]) -> dict[str, float]:
    """Forward + backward over this data-parallel rank's micro-batches, then one optimizer and LR step.

    The gradient is the mean of the micro-batch losses, averaged over data-parallel ranks by Megatron DDP.
    Returns the averaged metrics plus ``grad_norm`` and ``update_skipped``, identical on every rank.
    """
    per_micro_batch = forward_backward(state, micro_batches, loss_fn)
    step = optimizer_step(state)
    return _mean_metrics(per_micro_batch, metric_names) | step
