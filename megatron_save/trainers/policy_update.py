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


def mini_batch_layout(rows: int, parts: int, ranks: int, micro_batch_size: int) -> list[list[list[int]]]:
    """[mini-batch][data-parallel rank] -> row indices, -1 for a filler row.

    The rows are cut into ``parts`` contiguous, nearly equal mini-batches (fewer when there are fewer rows: no
    mini-batch is empty); each is padded with fillers to a multiple of ranks x micro_batch_size and split
    contiguously over ranks. Each optimizer step thus sees the same rows at any data-parallel size.
    """
    parts = min(parts, rows)
    bounds = [rows * k // parts for k in range(parts + 1)]
    layout = []
    for k in range(parts):
        block = list(range(bounds[k], bounds[k + 1]))
        block += [-1] * (-len(block) % (ranks * micro_batch_size))
        share = len(block) // ranks
        layout.append([block[r * share : (r + 1) * share] for r in range(ranks)])
    return layout


def policy_mini_batches(policy: Any, reference: Any | None, rows: PolicyRows, settings: PolicySettings,
                        pad_id: int, *, temperature: float) -> tuple[list[list[PolicyBatch]], dict[str, float]]:
    """This data-parallel rank's mini-batches of micro-batches (``mini_batch_layout``), with old and reference
    log-probs at the sampling ``temperature``, and the pre-update entropy / KL metrics of the whole batch. A filler
    row is a copy of its mini-batch's first row without loss tokens."""
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mbs = settings.micro_batch_size
    layout = mini_batch_layout(len(rows.sequences), settings.mini_batches, ranks, mbs)
    response_lengths = [len(s) - p for s, p in zip(rows.sequences, rows.prompt_lengths)]
    mine = [(i, part[0][0]) for part in layout for i in part[rank]]  # (row or -1, the mini-batch's first row)

    width = max(len(s) for s in rows.sequences)
    input_ids, attention_mask = pad_rows([rows.sequences[i if i >= 0 else first] for i, first in mine], pad_id,
                                         width)
    loss_mask = torch.zeros(len(mine), width - 1, dtype=torch.bool)
    advantages = torch.zeros(len(mine), width - 1)
    for row, (i, _) in enumerate(mine):
        if i >= 0:
            start = rows.prompt_lengths[i] - 1  # position t scores token t + 1: the first response token
            loss_mask[row, start : start + response_lengths[i]] = True
            advantages[row, start : start + response_lengths[i]] = rows.advantages[i]
    old = sequence_logprobs(policy, input_ids, mbs, temperature)
    ref_logp = (sequence_logprobs(reference, input_ids, mbs, temperature).logp if reference is not None
                else torch.zeros_like(old.logp))
    batch = PolicyBatch(input_ids, attention_mask, loss_mask, advantages, old.logp, ref_logp)

    token_mean = settings.loss != "gspo" and settings.aggregation == "token-mean"
    weight = lambda i: 0 if i < 0 else response_lengths[i] if token_mean else 1  # noqa: E731
    mini_batches, offset = [], 0
    for part in layout:
        total = sum(weight(i) for share in part for i in share)
        scale = len(part[rank]) // mbs * ranks  # Megatron divides by micro-batches; DDP averages over ranks
        micro = []
        for m in range(0, len(part[rank]), mbs):
            micro_rows = part[rank][m : m + mbs]
            share = (sum(weight(i) for i in micro_rows) if token_mean else mbs) / total if total else 0.0
            micro.append(dataclasses.replace(batch.rows(offset + m, offset + m + mbs), loss_scale=share * scale))
        mini_batches.append(micro)
        offset += len(part[rank])
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
