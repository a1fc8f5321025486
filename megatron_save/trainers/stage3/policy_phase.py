"""The policy phase of stage 3 (Algorithm 2, line 17): old and reference log-probs of the kept responses, rollout
correction against the engine's behaviour log-probs, and PPO-clip / GSPO / CISPO / GMPO updates with a
KL-to-reference term through Megatron's pipeline schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_save.algorithms import (
    cispo_policy_loss,
    gmpo_policy_loss,
    gspo_policy_loss,
    kl_penalty,
    mismatch_metrics,
    mismatch_sums,
    ppo_clip_policy_loss,
    rollout_correction_weights,
)
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
    shifted_row_values,
)
from megatron_save.trainers.stage3.config import PolicySettings
from megatron_save.trainers.step import train_step

POLICY_METRICS = ("pg_loss", "kl_loss", "clip_fraction", "approx_kl")
# Sums over the response tokens of a micro-batch, returned when the update's forward is the pre-update policy's.
PRE_UPDATE_SUMS = ("entropy_sum", "kl_to_reference_sum", "tokens")


# Losses whose ratio is per response: their loss (and KL term) is a mean over responses of token means.
SEQUENCE_LOSSES = ("gspo", "gmpo")


def _aggregation(settings: PolicySettings) -> str:
    return "seq-mean-token-mean" if settings.loss in SEQUENCE_LOSSES else settings.aggregation


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
    weights = None if batch.is_weights is None else batch.is_weights.to(device)
    clip = (settings.clip_low, settings.clip_high)
    if settings.loss == "gspo":
        surrogate = gspo_policy_loss(logp, old_logp, advantages, mask, *clip, is_weights=weights)
    elif settings.loss == "gmpo":
        surrogate = gmpo_policy_loss(logp, old_logp, advantages, mask, *clip, is_weights=weights)
    elif settings.loss == "cispo":
        surrogate = cispo_policy_loss(logp, old_logp, advantages, mask, *clip, settings.aggregation, norm_constant,
                                      is_weights=weights)
    else:
        surrogate = ppo_clip_policy_loss(logp, old_logp, advantages, mask, *clip, settings.dual_clip,
                                         settings.aggregation, norm_constant, is_weights=weights)
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


@dataclass
class CorrectedRow:
    """One trained response's rollout correction, for the rollout log ([len(response)] fp32 lists)."""

    old_logprobs: list[float]
    """log pi_old of each token (the trainer's forward before the update)."""
    rollout_logprobs: list[float]
    """log pi_rollout of each token (the rollout engine's)."""
    is_weights: list[float]
    """The IS weight multiplied into each token's loss (1 without IS, 0 where rejected)."""
    keep: list[bool]
    """The tokens rejection sampling kept."""


def policy_mini_batches(policy: Any, reference: Any | None, rows: PolicyRows, settings: PolicySettings,
                        pad_id: int, *, temperature: float, record: bool = False
                        ) -> tuple[list[list[PolicyBatch]], dict[str, float], list[CorrectedRow] | None]:
    """Collective: this data-parallel rank's mini-batches of micro-batches (``mini_batch_layout``), with reference
    log-probs at the sampling ``temperature`` and, when the update takes more than one optimizer step or rollout
    correction is on, old log-probs and the pre-update entropy / KL metrics of the whole batch (one step: its own
    first forward is the old policy's, and ``update_policy`` reports them). Rollout correction's rejected tokens
    leave the loss mask (and the token counts of the loss scales); its IS weights ride in the batch. With
    ``record``, the third value holds every row's correction (on every rank), else None."""
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    budget = settings.max_tokens_per_micro_batch
    mbs = 1 if budget else settings.micro_batch_size
    layout = mini_batch_layout(len(rows.sequences), settings.mini_batches, ranks, mbs)
    input_ids, attention_mask, loss_mask, advantages = policy_token_rows(rows, layout, rank, pad_id)
    correcting = settings.rollout_correction.enabled
    token_mean = settings.loss not in SEQUENCE_LOSSES and settings.aggregation == "token-mean"
    if budget:
        parts = policy_budget_parts(layout, rank, [len(s) for s in rows.sequences], budget)
        flat = [micro for part in parts for micro in part]

        def logprobs(model):
            return micro_batch_logprobs(model, input_ids, attention_mask, flat, temperature)
    else:
        parts, offset = [], 0
        for part in layout:
            parts.append([list(range(offset + m * mbs, offset + (m + 1) * mbs)) for m in range(len(part[rank]) // mbs)])
            offset += len(part[rank])

        def logprobs(model):
            return sequence_logprobs(model, input_ids, mbs, temperature)
    old = logprobs(policy) if len(layout) > 1 or correcting else None
    ref_logp = logprobs(reference).logp if reference is not None else None
    metrics = {} if old is None else _pre_update_metrics(old.entropy, old.logp, ref_logp, loss_mask, settings)
    is_weights, loss_tokens, corrected = None, rows.response_lengths, None
    if correcting:
        loss_mask, is_weights, loss_tokens, correction_metrics, corrected = _rollout_correction(
            rows, layout, rank, old.logp, loss_mask, settings, record)
        metrics |= correction_metrics
    if budget:
        scales = policy_budget_scales(layout, rank, parts, loss_tokens, token_mean)
    else:
        scales = policy_loss_scales(layout, rank, loss_tokens, token_mean, mbs)
    batch = PolicyBatch(input_ids, attention_mask, loss_mask, advantages, None if old is None else old.logp, ref_logp,
                        is_weights=is_weights)
    mini_batches = [[dataclasses.replace(_micro_batch(batch, micro, bool(budget)), loss_scale=scale)
                     for micro, scale in zip(part, part_scales)] for part, part_scales in zip(parts, scales)]
    return mini_batches, metrics, corrected


def _rollout_correction(rows: PolicyRows, layout: list[list[list[int]]], rank: int, old_logp: torch.Tensor,
                        loss_mask: torch.Tensor, settings: PolicySettings, record: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None, list[int], dict[str, float],
                                   list[CorrectedRow] | None]:
    """Collective: rank ``rank``'s rollout correction (``rollout_correction_weights``) of its rows [N, S - 1]:
    the loss mask without rejected tokens, the IS weights (None without IS), every row's count of loss tokens
    (over all data-parallel ranks, for the loss scales), the batch's mismatch metrics, and with ``record`` every
    row's CorrectedRow."""
    if rows.rollout_logprobs is None:
        raise RuntimeError("policy.rollout_correction: the rollout engine returned no behaviour log-probs")
    settings_rc = settings.rollout_correction
    rollout_logp = shifted_row_values(rows, rows.rollout_logprobs, layout, rank).to(old_logp.device)
    correction = rollout_correction_weights(old_logp, rollout_logp, loss_mask.to(old_logp.device),
                                            settings_rc.is_level, settings_rc.is_threshold, settings_rc.rs,
                                            settings_rc.rs_low, settings_rc.rs_high)
    sums = mismatch_sums(old_logp, rollout_logp, loss_mask.to(old_logp.device), correction)
    # Each row lives on one rank: the sum over ranks of the per-row counts (0 elsewhere) is every row's count.
    mine = torch.tensor([i for part in layout for i in part[rank]])
    counts = torch.zeros(len(rows.sequences), dtype=torch.float64, device=old_logp.device)
    real = mine >= 0
    counts[mine[real].to(old_logp.device)] = correction.keep[real.to(old_logp.device)].sum(dim=1).double()
    packed = torch.cat([sums.to(counts), counts])
    dist.all_reduce(packed, group=parallel_state.get_data_parallel_group())
    weights = correction.weights.cpu() if settings_rc.is_level is not None else None
    corrected = _gather_corrected_rows(rows, mine.tolist(), old_logp.cpu(), rollout_logp.cpu(),
                                       correction.weights.cpu(), correction.keep.cpu()) if record else None
    return (correction.keep.cpu(), weights, [int(c) for c in packed[len(sums):].tolist()],
            mismatch_metrics(packed[: len(sums)].cpu()), corrected)


def _gather_corrected_rows(rows: PolicyRows, mine: list[int], old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                           weights: torch.Tensor, keep: torch.Tensor) -> list[CorrectedRow]:
    """Collective over data-parallel ranks: every row's CorrectedRow, in row order, from each rank's own rows
    (their [N, S - 1] tensors in ``mine``'s order)."""
    local = {}
    for r, i in enumerate(mine):
        if i >= 0:
            start, length = rows.prompt_lengths[i] - 1, rows.response_lengths[i]
            span = slice(start, start + length)
            local[i] = CorrectedRow(old_logp[r, span].tolist(), rollout_logp[r, span].tolist(),
                                    weights[r, span].tolist(), keep[r, span].tolist())
    group = parallel_state.get_data_parallel_group()
    parts: list[dict[int, CorrectedRow] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    merged = {i: row for part in parts for i, row in part.items()}
    return [merged[i] for i in range(len(rows.sequences))]


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
