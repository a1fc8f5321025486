"""The policy step of stage 3 (Algorithm 2, line 17): advantages of the kept responses, old and reference
log-probs, and PPO-clip / GSPO updates with a KL-to-reference term through Megatron's pipeline schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_save.algorithms import (
    grpo_advantages,
    gspo_policy_loss,
    kl_penalty,
    ppo_clip_policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from megatron_save.algorithms.policy_loss import aggregate
from megatron_save.data.batching import PolicyBatch, pad_rows
from megatron_save.models.policy import sequence_logprobs, token_logprobs
from megatron_save.trainers.optimizer import TrainState
from megatron_save.trainers.stage3_config import PolicySettings
from megatron_save.trainers.step import train_step

POLICY_METRICS = ("pg_loss", "kl_loss", "clip_fraction", "approx_kl")


@dataclass
class PolicyRows:
    """The responses the policy trains on (identical list on every rank)."""

    sequences: list[list[int]]
    """Policy token ids of prompt + response."""
    prompt_lengths: list[int]
    """Policy tokens of each row's prompt."""
    advantages: list[torch.Tensor]
    """Per response token advantage, [len(response)] fp32 each."""


def token_advantages(kind: str, rewards: torch.Tensor, kept: torch.Tensor, response_lengths: torch.Tensor
                     ) -> torch.Tensor:
    """Advantages of every response token. rewards, kept [B, G], response_lengths [B, G] -> [B, G, T]
    (T the longest response; outcome advantages are constant along a response)."""
    rewards = rewards.float().nan_to_num(0.0)
    steps = torch.arange(int(response_lengths.max().clamp(min=1)))
    token_mask = (steps < response_lengths[..., None]) & kept[..., None]  # [B, G, T]
    if kind in ("grpo", "dr_grpo", "rloo"):
        per_response = (rloo_advantages(rewards, kept) if kind == "rloo"
                        else grpo_advantages(rewards, kept, norm_by_std=kind == "grpo"))  # [B, G]
        return per_response[..., None] * token_mask
    if kind == "reinforce_pp_baseline":
        return reinforce_pp_baseline_advantages(rewards, kept, token_mask)
    if kind == "reinforce_pp":
        last = (steps == (response_lengths[..., None] - 1)) & token_mask  # outcome reward on the last token
        flat = token_mask.flatten(0, 1)
        return reinforce_pp_advantages((rewards[..., None] * last).flatten(0, 1), flat).view_as(token_mask)
    raise ValueError(f"unknown advantage estimator {kind!r}")


def policy_rows(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], kept: torch.Tensor,
                advantages: torch.Tensor) -> PolicyRows:
    """The kept responses with their advantages. kept [B, G], advantages [B, G, T]."""
    rows = PolicyRows([], [], [])
    for b, g in kept.nonzero().tolist():
        response = response_ids[b][g]
        rows.sequences.append(prompt_ids[b] + response)
        rows.prompt_lengths.append(len(prompt_ids[b]))
        rows.advantages.append(advantages[b, g, : len(response)])
    return rows


def _aggregation(settings: PolicySettings) -> str:
    return "seq-mean-token-mean" if settings.loss == "gspo" else settings.aggregation


def policy_loss(settings: PolicySettings, norm_constant: float, batch: PolicyBatch, logits: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + kl_coef x KL to the reference, on one micro-batch. logits [b, S, V / TP]."""
    logp = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:])  # [b, S - 1]
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


def _loss_weights(lengths: list[int], token_mean: bool) -> list[int]:
    """What each row counts for in the global mean: its response tokens, or 1 per real row."""
    return [n if token_mean else int(n > 0) for n in lengths]


def policy_mini_batches(policy: Any, reference: Any | None, rows: PolicyRows, settings: PolicySettings,
                        pad_id: int) -> tuple[list[list[PolicyBatch]], dict[str, float]]:
    """This data-parallel rank's mini-batches of micro-batches, with old and reference log-probs, and the
    pre-update entropy / KL metrics of the whole batch.

    Rows are padded with fillers (a copy of row 0 with no loss tokens) to a multiple of mini-batches x
    data-parallel size x micro_batch_size. Mini-batch k is the k-th contiguous block of rows, split contiguously
    over data-parallel ranks, so that each optimizer step sees the same rows at any data-parallel size.
    """
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mbs, parts = settings.micro_batch_size, settings.mini_batches
    unit = ranks * parts * mbs
    total = -(-len(rows.sequences) // unit) * unit
    fillers = total - len(rows.sequences)
    sequences = rows.sequences + [rows.sequences[0]] * fillers
    response_lengths = [len(s) - p for s, p in zip(rows.sequences, rows.prompt_lengths)] + [0] * fillers
    per_part = total // parts  # rows of one mini-batch, all ranks
    per_rank = per_part // ranks  # rows of one mini-batch on one rank
    mine = [k * per_part + rank * per_rank + i for k in range(parts) for i in range(per_rank)]

    input_ids, attention_mask = pad_rows([sequences[i] for i in mine], pad_id, max(len(s) for s in sequences))
    loss_mask = torch.zeros(len(mine), input_ids.shape[1] - 1, dtype=torch.bool)
    advantages = torch.zeros(len(mine), input_ids.shape[1] - 1)
    for row, i in enumerate(mine):
        if i < len(rows.sequences):
            start = rows.prompt_lengths[i] - 1  # position t scores token t + 1: the first response token
            loss_mask[row, start : start + response_lengths[i]] = True
            advantages[row, start : start + response_lengths[i]] = rows.advantages[i]
    old = sequence_logprobs(policy, input_ids, mbs)
    ref_logp = sequence_logprobs(reference, input_ids, mbs).logp if reference is not None else torch.zeros_like(
        old.logp)
    batch = PolicyBatch(input_ids, attention_mask, loss_mask, advantages, old.logp, ref_logp)

    token_mean = settings.loss != "gspo" and settings.aggregation == "token-mean"
    weights = _loss_weights(response_lengths, token_mean)
    scale = (per_rank // mbs) * ranks  # Megatron divides by micro-batches; DDP averages over ranks
    mini_batches = []
    for k, part in enumerate(batch.split(per_rank)):
        part_total = sum(weights[k * per_part : (k + 1) * per_part])
        micro = []
        for m, micro_batch in enumerate(part.split(mbs)):
            start = k * per_part + rank * per_rank + m * mbs
            weight = sum(weights[start : start + mbs]) if token_mean else mbs
            share = weight / part_total if part_total else 0.0
            micro.append(dataclasses.replace(micro_batch, loss_scale=share * scale))
        mini_batches.append(micro)
    return mini_batches, _pre_update_metrics(old.entropy, old.logp, ref_logp, loss_mask, settings)


def _pre_update_metrics(entropy: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                        settings: PolicySettings) -> dict[str, float]:
    """Mean entropy and KL to the reference over every response token of the batch (all data-parallel ranks)."""
    sums = torch.stack([entropy[mask].sum(), kl_penalty(logp, ref_logp, settings.kl_kind)[mask].sum(),
                        mask.sum().float()]).double()
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    tokens = max(sums[2].item(), 1.0)
    return {"policy/entropy": sums[0].item() / tokens, "policy/kl_to_reference": sums[1].item() / tokens}


def update_policy(state: TrainState, mini_batches: list[list[PolicyBatch]], settings: PolicySettings,
                  norm_constant: float) -> dict[str, float]:
    """One optimizer step per mini-batch; returns the metrics averaged over mini-batches."""
    loss_fn = partial(policy_loss, settings, norm_constant)
    steps = [train_step(state, micro, loss_fn, POLICY_METRICS) for micro in mini_batches]
    names = (*POLICY_METRICS, "grad_norm", "update_skipped")
    return {f"policy/{name}": sum(s[name] for s in steps) / len(steps) for name in names}
