"""The PRIME baseline in stage 3 (its Algorithm 1): outcome labels of the step's responses (from the frozen reward
model's scores, or a verifier), its accuracy filter, the implicit PRM's token-level rewards and its cross-entropy
update before the policy's, and the advantages that combine both sources.

The PRM reads the policy's own tokens (it starts from the policy's checkpoint), so its rewards line up with the
policy's response tokens without any re-encoding."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_save.algorithms import accuracy_filter, implicit_process_rewards, outcome_labels, prime_advantages
from megatron_save.data.batching import ImplicitPrmBatch
from megatron_save.models.policy import sequence_logprobs
from megatron_save.models.train_state import TrainState
from megatron_save.trainers.stage3.batches import PolicyRows, mini_batch_layout, policy_rows, policy_token_rows
from megatron_save.trainers.stage3.config import PrimeSettings
from megatron_save.trainers.stage3.groups import FeedbackPartition, GroupScores, OutcomeFeedback, RolloutGroups
from megatron_save.trainers.stage3.verifier import Verifier, verifier_grades
from megatron_save.trainers.step import train_step
from megatron_save.trainers.strategies import RMStrategy


def label_outcomes(settings: PrimeSettings, groups: RolloutGroups, rewards: torch.Tensor, tokenizer: Any,
                   verifier: Verifier | None) -> OutcomeFeedback:
    """Outcome labels by ``settings.labels`` (the frozen RM's scores [B, G] or reward.verifier's grades) and the
    prompts PRIME's accuracy filter keeps."""
    if settings.labels == "verifier":
        labels = verifier_grades(verifier, groups, tokenizer)
    else:
        labels = outcome_labels(rewards.nan_to_num(0.0), groups.valid, settings.labels)
    in_range = accuracy_filter(labels, groups.valid, settings.accuracy_low, settings.accuracy_high)
    return OutcomeFeedback(labels, in_range)


def _kept_rows(groups: RolloutGroups, kept: torch.Tensor) -> PolicyRows:
    """The kept responses as policy rows (their advantages are not needed here)."""
    zeros = torch.zeros(*kept.shape, max(int(groups.response_lengths.max()), 1))
    return policy_rows(groups.policy_prompt_ids, groups.policy_response_ids, kept, zeros)


def _this_rank_rows(rows: PolicyRows, micro_batch_size: int, pad_id: int
                    ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's row indices (-1: filler), and this data-parallel rank's input_ids [n, S], attention_mask
    [n, S] and loss_mask [n, S - 1]."""
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    layout = mini_batch_layout(len(rows.sequences), 1, ranks, micro_batch_size)
    input_ids, attention_mask, loss_mask, _ = policy_token_rows(rows, layout, rank, pad_id)
    return layout[0], input_ids, attention_mask, loss_mask


def _to_groups(per_rank: torch.Tensor, shares: list[list[int]], rows: PolicyRows, kept: torch.Tensor,
               steps: int) -> torch.Tensor:
    """[B, G, T] from this rank's [n, S - 1] shifted-frame token values, gathered over data-parallel ranks."""
    gathered = [torch.empty_like(per_rank) for _ in shares]
    dist.all_gather(gathered, per_rank.contiguous(), group=parallel_state.get_data_parallel_group())
    values = torch.zeros(*kept.shape, steps)
    slots = kept.nonzero().tolist()  # row i of ``rows`` is slot i
    for share, block in zip(shares, gathered):
        for position, i in enumerate(share):
            if i >= 0:
                b, g = slots[i]
                start, length = rows.prompt_lengths[i] - 1, rows.response_lengths[i]
                values[b, g, :length] = block[position, start : start + length].cpu()
    return values


def update_implicit_prm(state: TrainState, reference: Any, strategy: RMStrategy, settings: PrimeSettings,
                        groups: RolloutGroups, kept: torch.Tensor, trained: torch.Tensor, labels: torch.Tensor,
                        pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Collective: PRIME's Algorithm 1, lines 7-8: the PRM's token rewards of the kept responses (kept [B, G],
    non-empty), then one optimizer step of its cross-entropy loss against ``labels`` [B, G] over the ``trained``
    ones (a subset of kept; none: no step). Returns the token rewards [B, G, T] (of the updated PRM with
    ``recompute_after_update``) and the update's metrics."""
    rows = _kept_rows(groups, kept)
    mbs = settings.micro_batch_size
    shares, input_ids, attention_mask, loss_mask = _this_rank_rows(rows, mbs, pad_id)
    ref_logp = sequence_logprobs(reference, input_ids, mbs).logp  # [n, S - 1]
    logp = sequence_logprobs(state.module, input_ids, mbs).logp
    steps = max(int(groups.response_lengths.max()), 1)
    rewards = _to_groups(implicit_process_rewards(logp, ref_logp, loss_mask, settings.beta), shares, rows, kept,
                         steps)
    metrics = {"prm_loss": 0.0, "prm_accuracy": float("nan"), "grad_norm": 0.0, "update_skipped": 1.0}
    if trained.any():
        slots = kept.nonzero().tolist()
        mine = shares[parallel_state.get_data_parallel_rank()]
        row_labels = torch.tensor([float(labels[tuple(slots[i])]) if i >= 0 else 0.0 for i in mine])
        factor = len(mine) // mbs * len(shares) / int(trained.sum())  # micro-batches x ranks / trained rows
        weights = torch.tensor([factor if i >= 0 and trained[tuple(slots[i])] else 0.0 for i in mine])
        batch = ImplicitPrmBatch(input_ids, attention_mask, loss_mask, ref_logp, row_labels, weights)
        metrics = train_step(state, batch.split(mbs), partial(strategy.loss, beta=settings.beta),
                             strategy.loss_metrics)
    if settings.recompute_after_update and trained.any():
        logp = sequence_logprobs(state.module, input_ids, mbs).logp
        rewards = _to_groups(implicit_process_rewards(logp, ref_logp, loss_mask, settings.beta), shares, rows, kept,
                             steps)
    sequence_rewards = rewards.sum(dim=2)[kept]
    return rewards, {"prm/loss": metrics["prm_loss"], "prm/accuracy": metrics["prm_accuracy"],
                     "prm/grad_norm": metrics["grad_norm"], "prm/update_skipped": metrics["update_skipped"],
                     "prm/sequence_reward_mean": float(sequence_rewards.mean()),
                     "prm/label_mean": float(labels[kept].mean()), "prm/trained_responses": float(trained.sum())}


def with_process_rewards(scores: GroupScores, process_rewards: torch.Tensor) -> GroupScores:
    """The scores with the PRM's token rewards [B, G, T] attached."""
    return replace(scores, outcome=replace(scores.outcome, process_rewards=process_rewards))


def prime_token_advantages(scores: GroupScores, partition: FeedbackPartition, response_lengths: torch.Tensor,
                           settings: PrimeSettings) -> torch.Tensor:
    """[B, G, T] PRIME's advantages of the kept responses' tokens (eq. 5 in its released code's form: the
    leave-one-out baseline r_t K / (K - 1) - sum_j mean_j / (K - 1), weighted, optionally whitened), K the group's
    kept responses: with the accuracy filter, every valid response of a prompt inside its range."""
    process = scores.outcome.process_rewards  # [B, G, T]
    steps = torch.arange(process.shape[2])
    token_mask = steps < response_lengths[..., None]  # [B, G, T]
    return prime_advantages(process, token_mask, scores.outcome.labels, partition.kept, settings.process_coef,
                            settings.outcome_coef, whiten=settings.whiten_advantages)
