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
from megatron_save.models.policy import (
    micro_batch_logprobs,
    sequence_logprobs,
    token_logprobs,
    vocab_parallel_entropy,
)
from megatron_save.models.train_state import TrainState
from megatron_save.trainers.stage3.batches import (
    PolicyRows,
    mini_batch_layout,
    policy_budget_parts,
    policy_budget_scales,
    policy_loss_scales,
    policy_token_rows,
)
from megatron_save.trainers.stage3.config import PolicySettings
from megatron_save.trainers.step import train_step

POLICY_METRICS = ("pg_loss", "kl_loss", "clip_fraction", "approx_kl")
# Sums over the response tokens of a micro-batch, returned when the update's forward is the pre-update policy's.
PRE_UPDATE_SUMS = ("entropy_sum", "kl_to_reference_sum", "tokens")


def _aggregation(settings: PolicySettings) -> str:
    return "seq-mean-token-mean" if settings.loss == "gspo" else settings.aggregation


def policy_loss(settings: PolicySettings, norm_constant: float, temperature: float, batch: PolicyBatch,
                logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + kl_coef x KL to the reference, on one micro-batch, with log-probs of
    softmax(logits / temperature). Without old log-probs in the batch, this forward is the old policy's: its
    detached log-probs are the old ones (ratio 1) and its entropy and KL sums are the pre-update statistics.
    logits [b, S, V / TP]."""
    logp = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature)  # [b, S - 1]
    device = logp.device
    mask, advantages = batch.loss_mask.to(device), batch.advantages.to(device)
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp.to(device)
    ref_logp = None if batch.ref_logp is None else batch.ref_logp.to(device)
    if settings.loss == "gspo":
        surrogate = gspo_policy_loss(logp, old_logp, advantages, mask, settings.clip_low, settings.clip_high)
    else:
        surrogate = ppo_clip_policy_loss(logp, old_logp, advantages, mask, settings.clip_low, settings.clip_high,
                                         settings.dual_clip, settings.aggregation, norm_constant)
    kl = torch.zeros((), device=device)
    if settings.kl_coef > 0 and ref_logp is not None:
        kl = aggregate(kl_penalty(logp, ref_logp, settings.kl_kind), mask, _aggregation(settings), norm_constant)
    loss = (surrogate.loss + settings.kl_coef * kl) * batch.loss_scale
    # Scaled like the loss, so that the averages over micro-batches and ranks are the whole mini-batch's values.
    metrics = {"pg_loss": surrogate.loss, "kl_loss": kl, "clip_fraction": surrogate.clip_fraction,
               "approx_kl": surrogate.approx_kl}
    metrics = {name: value * batch.loss_scale for name, value in metrics.items()}
    if batch.old_logp is None:
        metrics |= _pre_update_sums(logits, old_logp, ref_logp, mask, settings, temperature)
    return loss, metrics


def _pre_update_sums(logits: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor,
                     settings: PolicySettings, temperature: float) -> dict[str, torch.Tensor]:
    """PRE_UPDATE_SUMS of a micro-batch: entropy and KL to the reference summed over its response tokens, and
    their count. logits [b, S, V / TP], logp / ref_logp / mask [b, S - 1]."""
    entropy = vocab_parallel_entropy(logits[:, :-1].detach(), temperature)  # [b, S - 1]
    kl = kl_penalty(logp, ref_logp, settings.kl_kind)[mask].sum() if ref_logp is not None else torch.zeros(())
    return {"entropy_sum": entropy[mask].sum(), "kl_to_reference_sum": kl.to(logp.device),
            "tokens": mask.sum().float()}


def policy_mini_batches(policy: Any, reference: Any | None, rows: PolicyRows, settings: PolicySettings,
                        pad_id: int, *, temperature: float) -> tuple[list[list[PolicyBatch]], dict[str, float]]:
    """Collective: this data-parallel rank's mini-batches of micro-batches (``mini_batch_layout``), with reference
    log-probs at the sampling ``temperature`` and, when the update takes more than one optimizer step, old
    log-probs and the pre-update entropy / KL metrics of the whole batch (one step: its own first forward is the
    old policy's, and ``update_policy`` reports them)."""
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    budget = settings.max_tokens_per_micro_batch
    mbs = 1 if budget else settings.micro_batch_size
    layout = mini_batch_layout(len(rows.sequences), settings.mini_batches, ranks, mbs)
    input_ids, attention_mask, loss_mask, advantages = policy_token_rows(rows, layout, rank, pad_id)
    token_mean = settings.loss != "gspo" and settings.aggregation == "token-mean"
    if budget:
        parts = policy_budget_parts(layout, rank, [len(s) for s in rows.sequences], budget)
        scales = policy_budget_scales(layout, rank, parts, rows.response_lengths, token_mean)
        flat = [micro for part in parts for micro in part]

        def logprobs(model):
            return micro_batch_logprobs(model, input_ids, attention_mask, flat, temperature)
    else:
        scales = policy_loss_scales(layout, rank, rows.response_lengths, token_mean, mbs)
        parts, offset = [], 0
        for part_scales in scales:
            parts.append([list(range(offset + m * mbs, offset + (m + 1) * mbs)) for m in range(len(part_scales))])
            offset += len(part_scales) * mbs

        def logprobs(model):
            return sequence_logprobs(model, input_ids, mbs, temperature)
    old = logprobs(policy) if len(layout) > 1 else None
    ref_logp = logprobs(reference).logp if reference is not None else None
    batch = PolicyBatch(input_ids, attention_mask, loss_mask, advantages, None if old is None else old.logp, ref_logp)
    mini_batches = []
    for part, part_scales in zip(parts, scales):
        mini_batches.append([dataclasses.replace(_micro_batch(batch, micro, bool(budget)), loss_scale=scale)
                             for micro, scale in zip(part, part_scales)])
    metrics = {} if old is None else _pre_update_metrics(old.entropy, old.logp, ref_logp, loss_mask, settings)
    return mini_batches, metrics


def _micro_batch(batch: PolicyBatch, rows: list[int], own_width: bool) -> PolicyBatch:
    """Rows ``rows`` of ``batch`` (consecutive ones for fixed micro-batches), padded to the batch's longest row,
    or with ``own_width`` to their own longest (a token-budget micro-batch)."""
    if not own_width:
        return batch.rows(rows[0], rows[-1] + 1)
    return batch.select(rows, int(batch.attention_mask[rows].sum(dim=1).max()))


def old_logprobs_passes(mini_batches: list[list[PolicyBatch]]) -> int:
    """Policy forwards the old log-probs took: 0 when the update's own forward gives them, else 1."""
    return int(mini_batches[0][0].old_logp is not None)


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
    over mini-batches, and the pre-update entropy / KL when the update's forward was the old policy's."""
    loss_fn = partial(policy_loss, settings, norm_constant, temperature)
    own_old = not old_logprobs_passes(mini_batches)
    names = POLICY_METRICS + PRE_UPDATE_SUMS if own_old else POLICY_METRICS
    steps = [train_step(state, micro, loss_fn, names) for micro in mini_batches]
    metrics = {f"policy/{name}": sum(s[name] for s in steps) / len(steps)
               for name in (*POLICY_METRICS, "grad_norm", "update_skipped")}
    if own_old:
        # Means of the micro-batch sums: their ratio is the ratio of the batch's sums.
        (step,) = steps
        tokens = step["tokens"] or 1.0  # no token: both sums are 0
        metrics["policy/entropy"] = step["entropy_sum"] / tokens
        if mini_batches[0][0].ref_logp is not None:
            metrics["policy/kl_to_reference"] = step["kl_to_reference_sum"] / tokens
    return metrics
