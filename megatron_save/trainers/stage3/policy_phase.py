"""The policy phase of stage 3 (Algorithm 2, line 17): old and reference log-probs of the kept responses, and
PPO-clip / GSPO updates with a KL-to-reference term through Megatron's pipeline schedule."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_save.algorithms import gspo_policy_loss, kl_penalty, ppo_clip_policy_loss
from megatron_save.algorithms.policy_loss import aggregate
from megatron_save.data.batching import PolicyBatch
from megatron_save.models.policy import sequence_logprobs, token_logprobs
from megatron_save.models.train_state import TrainState
from megatron_save.trainers.stage3.batches import PolicyRows, mini_batch_layout, policy_loss_scales, policy_token_rows
from megatron_save.trainers.stage3.config import PolicySettings
from megatron_save.trainers.step import train_step

POLICY_METRICS = ("pg_loss", "kl_loss", "clip_fraction", "approx_kl")


def _aggregation(settings: PolicySettings) -> str:
    return "seq-mean-token-mean" if settings.loss == "gspo" else settings.aggregation


def policy_loss(settings: PolicySettings, norm_constant: float, temperature: float, batch: PolicyBatch,
                logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + kl_coef x KL to the reference, on one micro-batch, with log-probs of
    softmax(logits / temperature). logits [b, S, V / TP]."""
    logp = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature)  # [b, S - 1]
    device = logp.device
    mask, advantages = batch.loss_mask.to(device), batch.advantages.to(device)
    old_logp, ref_logp = batch.old_logp.to(device), batch.ref_logp.to(device)
    if settings.loss == "gspo":
        surrogate = gspo_policy_loss(logp, old_logp, advantages, mask, settings.clip_low, settings.clip_high)
    else:
        surrogate = ppo_clip_policy_loss(logp, old_logp, advantages, mask, settings.clip_low, settings.clip_high,
                                         settings.dual_clip, settings.aggregation, norm_constant)
    kl = torch.zeros((), device=device)
    if settings.kl_coef > 0:
        kl = aggregate(kl_penalty(logp, ref_logp, settings.kl_kind), mask, _aggregation(settings), norm_constant)
    loss = (surrogate.loss + settings.kl_coef * kl) * batch.loss_scale
    # Scaled like the loss, so that the averages over micro-batches and ranks are the whole mini-batch's values.
    metrics = {"pg_loss": surrogate.loss, "kl_loss": kl, "clip_fraction": surrogate.clip_fraction,
               "approx_kl": surrogate.approx_kl}
    return loss, {name: value * batch.loss_scale for name, value in metrics.items()}


def policy_mini_batches(policy: Any, reference: Any | None, rows: PolicyRows, settings: PolicySettings,
                        pad_id: int, *, temperature: float) -> tuple[list[list[PolicyBatch]], dict[str, float]]:
    """Collective: this data-parallel rank's mini-batches of micro-batches (``mini_batch_layout``), with old and
    reference log-probs at the sampling ``temperature``, and the pre-update entropy / KL metrics of the whole
    batch."""
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mbs = settings.micro_batch_size
    layout = mini_batch_layout(len(rows.sequences), settings.mini_batches, ranks, mbs)
    input_ids, attention_mask, loss_mask, advantages = policy_token_rows(rows, layout, rank, pad_id)
    old = sequence_logprobs(policy, input_ids, mbs, temperature)
    ref_logp = (sequence_logprobs(reference, input_ids, mbs, temperature).logp if reference is not None
                else torch.zeros_like(old.logp))
    batch = PolicyBatch(input_ids, attention_mask, loss_mask, advantages, old.logp, ref_logp)
    token_mean = settings.loss != "gspo" and settings.aggregation == "token-mean"
    scales = policy_loss_scales(layout, rank, rows.response_lengths, token_mean, mbs)
    mini_batches, offset = [], 0
    for part_scales in scales:
        mini_batches.append([dataclasses.replace(batch.rows(offset + m * mbs, offset + (m + 1) * mbs),
                                                 loss_scale=scale) for m, scale in enumerate(part_scales)])
        offset += len(part_scales) * mbs
    metrics = _pre_update_metrics(old.entropy, old.logp, ref_logp if reference is not None else None, loss_mask,
                                  settings)
    return mini_batches, metrics


def _pre_update_metrics(entropy: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None,
                        mask: torch.Tensor, settings: PolicySettings) -> dict[str, float]:
    """Mean entropy (and KL to the reference, when there is one) over every response token of the batch (all
    data-parallel ranks)."""
    kl = kl_penalty(logp, ref_logp, settings.kl_kind)[mask].sum() if ref_logp is not None else torch.zeros(())
    sums = torch.stack([entropy[mask].sum(), kl, mask.sum().float()]).double()
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    tokens = max(sums[2].item(), 1.0)
    metrics = {"policy/entropy": sums[0].item() / tokens}
    if ref_logp is not None:
        metrics["policy/kl_to_reference"] = sums[1].item() / tokens
    return metrics


def update_policy(state: TrainState, mini_batches: list[list[PolicyBatch]], settings: PolicySettings,
                  norm_constant: float, *, temperature: float) -> dict[str, float]:
    """One optimizer step per mini-batch (log-probs at the sampling ``temperature``); returns the metrics averaged
    over mini-batches."""
    loss_fn = partial(policy_loss, settings, norm_constant, temperature)
    steps = [train_step(state, micro, loss_fn, POLICY_METRICS) for micro in mini_batches]
    names = (*POLICY_METRICS, "grad_norm", "update_skipped")
    return {f"policy/{name}": sum(s[name] for s in steps) / len(steps) for name in names}
