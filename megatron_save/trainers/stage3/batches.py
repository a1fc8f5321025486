"""Stage 3's batch building as pure functions: which rows each data-parallel rank trains on, their padding, loss
masks and the loss scales that turn Megatron's average over micro-batches and ranks into the whole batch's mean.
No model, no process group: ranks and rank are arguments, so every invariant is tested on plain tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_save.data.batching import ResponseGroupBatch, ScoredRowBatch
from megatron_save.data.token_budget import agreed_micro_batches, partition_by_tokens, share_scales
from megatron_save.trainers.stage3.groups import RolloutGroups
from megatron_save.utils.tensors import pad_rows


def prompts_per_rank(prompts: int, ranks: int, micro_batch_size: int) -> int:
    """Prompt slots of each data-parallel rank in a reward-model update: B padded to a multiple of ranks x
    micro_batch_size, split evenly."""
    return -(-prompts // (ranks * micro_batch_size)) * micro_batch_size


def response_group_batches(groups: RolloutGroups, trained: torch.Tensor, threshold: float, micro_batch_size: int,
                           pad_id: int, ranks: int, rank: int, grades: torch.Tensor | None = None
                           ) -> list[ResponseGroupBatch]:
    """Data-parallel rank ``rank`` of ``ranks``: its micro-batches of ``micro_batch_size`` prompts x G slots, for
    an update that scores, partitions at ``threshold`` and learns from the ``trained`` [B, G] responses (with a
    verifier's ``grades`` [B, G] of them, when its pairs come from those).

    The B prompts are padded with empty groups (no valid slot: they add nothing) to a multiple of ranks x
    micro_batch_size and split contiguously over ranks (``prompts_per_rank`` each).
    """
    prompts, group_size = groups.valid.shape
    per_rank = prompts_per_rank(prompts, ranks, micro_batch_size)
    slots = [(i, j) for i in range(rank * per_rank, (rank + 1) * per_rank) for j in range(group_size)]
    sequences = [groups.rm_sequences[i][j] if i < prompts else groups.rm_sequences[0][0] for i, j in slots]
    width = max(len(s) for row in groups.rm_sequences for s in row)
    input_ids, attention_mask = pad_rows(sequences, pad_id, width)

    def flag(mask: torch.Tensor) -> torch.Tensor:  # [B, G] -> [slots]
        return torch.tensor([i < prompts and bool(mask[i, j]) for i, j in slots])

    micro_batches = per_rank // micro_batch_size
    value_count = int(trained.any(dim=1).sum())
    batch = ResponseGroupBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        # An invalid slot holds the prompt alone, so V is read at the same position in every slot of a group.
        prompt_lengths=torch.tensor([groups.rm_prompt_lengths[i] if i < prompts else 1 for i, _ in slots]),
        valid=flag(groups.valid),
        trained=flag(trained),
        group_size=group_size,
        threshold=threshold,
        sum_scale=float(micro_batches * ranks),
        value_scale=micro_batches * ranks / value_count if value_count else 0.0,
        grades=None if grades is None else torch.tensor([float(grades[i, j]) if i < prompts else 0.0
                                                         for i, j in slots]),
    )
    return batch.split(micro_batch_size * group_size)


REWARD_BUDGET = "reward.max_tokens_per_micro_batch"
POLICY_BUDGET = "policy.max_tokens_per_micro_batch"


def response_slot_partition(groups: RolloutGroups, budget: int, ranks: int) -> list[list[list[int]]]:
    """[data-parallel rank][micro-batch] -> flat slots i * G + j of a token-budget reward-model update: rank r
    holds the slots of its ``prompts_per_rank(B, ranks, 1)`` consecutive prompts (padding prompts past B hold
    copies of slot (0, 0)), cut by ``partition_by_tokens`` into the same number of micro-batches on every rank."""
    prompts, group_size = groups.valid.shape
    per_rank = prompts_per_rank(prompts, ranks, 1)

    def length(slot: int) -> int:
        i, j = divmod(slot, group_size)
        return len(groups.rm_sequences[i][j] if i < prompts else groups.rm_sequences[0][0])

    slots = [list(range(r * per_rank * group_size, (r + 1) * per_rank * group_size)) for r in range(ranks)]
    lengths = [[length(s) for s in mine] for mine in slots]
    count = agreed_micro_batches(lengths, budget, REWARD_BUDGET)
    return [[[mine[k] for k in part] for part in partition_by_tokens(rank_lengths, budget, count, REWARD_BUDGET)]
            for mine, rank_lengths in zip(slots, lengths)]


def scored_row_batches(groups: RolloutGroups, parts: list[list[int]], pad_id: int, ranks: int,
                       reward_grad: torch.Tensor | None = None, value_grad: torch.Tensor | None = None
                       ) -> list[ScoredRowBatch]:
    """One rank's micro-batches of flat slots ``parts`` (``response_slot_partition``), each padded to its own
    longest row, with the cached gradients dJ/dR [B, G] and dJ/dV [B] (None: zeros, the scoring pass); dJ/dV
    rides on slot 0 of its group (every slot of a group reads the same V)."""
    prompts, group_size = groups.valid.shape
    batches = []
    for part in parts:
        rows = [divmod(slot, group_size) for slot in part]
        sequences = [groups.rm_sequences[i][j] if i < prompts else groups.rm_sequences[0][0] for i, j in rows]
        input_ids, attention_mask = pad_rows(sequences, pad_id)
        batches.append(ScoredRowBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            prompt_lengths=torch.tensor([groups.rm_prompt_lengths[i] if i < prompts else groups.rm_prompt_lengths[0]
                                         for i, _ in rows]),
            reward_grad=torch.tensor([float(reward_grad[i, j]) if reward_grad is not None and i < prompts else 0.0
                                      for i, j in rows]),
            value_grad=torch.tensor([float(value_grad[i]) if value_grad is not None and i < prompts and j == 0
                                     else 0.0 for i, j in rows]),
            loss_scale=float(len(parts) * ranks),
        ))
    return batches


@dataclass
class PolicyRows:
    """The responses the policy trains on (identical list on every rank)."""

    sequences: list[list[int]]
    """Policy token ids of prompt + response."""
    prompt_lengths: list[int]
    """Policy tokens of each row's prompt."""
    advantages: list[torch.Tensor]
    """Per response token advantage, [len(response)] fp32 each."""
    rollout_logprobs: list[torch.Tensor] | None = None
    """Per response token behaviour log-prob from the rollout engine, [len(response)] fp32 each (rollout
    correction), else None."""

    @property
    def response_lengths(self) -> list[int]:
        """Policy tokens of each row's response."""
        return [len(s) - p for s, p in zip(self.sequences, self.prompt_lengths)]


def policy_rows(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], kept: torch.Tensor,
                advantages: torch.Tensor, rollout_logprobs: list[list[list[float]]] | None = None) -> PolicyRows:
    """The kept responses with their advantages (and behaviour log-probs [B][G][len]). kept [B, G], advantages
    [B, G, T]."""
    rows = PolicyRows([], [], [], None if rollout_logprobs is None else [])
    for b, g in kept.nonzero().tolist():
        response = response_ids[b][g]
        rows.sequences.append(prompt_ids[b] + response)
        rows.prompt_lengths.append(len(prompt_ids[b]))
        rows.advantages.append(advantages[b, g, : len(response)])
        if rows.rollout_logprobs is not None:
            rows.rollout_logprobs.append(torch.tensor(rollout_logprobs[b][g], dtype=torch.float32))
    return rows


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


def policy_token_rows(rows: PolicyRows, layout: list[list[list[int]]], rank: int, pad_id: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows of every mini-batch, in order, padded to the batch's longest row: input_ids [N, S],
    attention_mask [N, S], and in the shifted frame (position t scores token t + 1) loss_mask [N, S - 1] and
    advantages [N, S - 1]. A filler row is a copy of its mini-batch's first row without loss tokens."""
    mine = [(i, part[0][0]) for part in layout for i in part[rank]]  # (row or -1, the mini-batch's first row)
    width = max(len(s) for s in rows.sequences)
    input_ids, attention_mask = pad_rows([rows.sequences[i if i >= 0 else first] for i, first in mine], pad_id,
                                         width)
    loss_mask = torch.zeros(len(mine), width - 1, dtype=torch.bool)
    advantages = torch.zeros(len(mine), width - 1)
    response_lengths = rows.response_lengths
    for row, (i, _) in enumerate(mine):
        if i >= 0:
            start = rows.prompt_lengths[i] - 1  # the first response token
            loss_mask[row, start : start + response_lengths[i]] = True
            advantages[row, start : start + response_lengths[i]] = rows.advantages[i]
    return input_ids, attention_mask, loss_mask, advantages


def shifted_row_values(rows: PolicyRows, values: list[torch.Tensor], layout: list[list[list[int]]], rank: int
                       ) -> torch.Tensor:
    """Per response token ``values`` ([len(response)] each, by row) of rank ``rank``'s rows, in the order and
    shifted frame of ``policy_token_rows``: [N, S - 1], 0 off the response tokens and on filler rows."""
    mine = [i for part in layout for i in part[rank]]
    width = max(len(s) for s in rows.sequences)
    out = torch.zeros(len(mine), width - 1)
    for row, i in enumerate(mine):
        if i >= 0:
            start = rows.prompt_lengths[i] - 1
            out[row, start : start + len(values[i])] = values[i]
    return out


def policy_loss_scales(layout: list[list[list[int]]], rank: int, response_lengths: list[int], token_mean: bool,
                       micro_batch_size: int) -> list[list[float]]:
    """[mini-batch][micro-batch] loss scale of rank ``rank``: the micro-batch's share of its mini-batch's tokens
    (``token_mean``) or sequences, times micro-batches x ranks (Megatron divides by micro-batches, DDP averages
    over ranks). Summed over every rank's micro-batches and divided by micro-batches x ranks, a mini-batch's
    shares add up to 1."""
    ranks = len(layout[0])

    def weight(i: int) -> int:
        return 0 if i < 0 else response_lengths[i] if token_mean else 1

    scales = []
    for part in layout:
        total = sum(weight(i) for share in part for i in share)
        mine = part[rank]
        factor = len(mine) // micro_batch_size * ranks
        scales.append([((sum(weight(i) for i in mine[m : m + micro_batch_size]) if token_mean else micro_batch_size)
                         / total if total else 0.0) * factor for m in range(0, len(mine), micro_batch_size)])
    return scales


def policy_budget_parts(layout: list[list[list[int]]], rank: int, sequence_lengths: list[int], budget: int
                        ) -> list[list[list[int]]]:
    """Token-budget micro-batches of the policy update: [mini-batch][micro-batch] -> positions in rank ``rank``'s
    rows (``policy_token_rows`` order: its share of each mini-batch in turn), every rank with the same count per
    mini-batch. ``layout`` from ``mini_batch_layout(..., micro_batch_size=1)``; a filler (-1) counts as a copy of
    its mini-batch's first row. sequence_lengths: prompt + response tokens of each row."""
    parts, offset = [], 0
    for part in layout:
        lengths = [[sequence_lengths[i if i >= 0 else part[0][0]] for i in share] for share in part]
        count = agreed_micro_batches(lengths, budget, POLICY_BUDGET)
        parts.append([[offset + k for k in micro] for micro in
                      partition_by_tokens(lengths[rank], budget, count, POLICY_BUDGET)])
        offset += len(part[rank])
    return parts


def policy_budget_scales(layout: list[list[list[int]]], rank: int, parts: list[list[list[int]]],
                         response_lengths: list[int], token_mean: bool) -> list[list[float]]:
    """[mini-batch][micro-batch] loss scale of rank ``rank``'s token-budget micro-batches (``policy_budget_parts``):
    as ``policy_loss_scales``, the micro-batch's share of its mini-batch's tokens (``token_mean``) or sequences
    (its rows, fillers included, as a sequence mean counts them), times micro-batches x ranks."""
    ranks = len(layout[0])

    def weight(i: int) -> int:
        return 0 if i < 0 else response_lengths[i] if token_mean else 1

    scales, offset = [], 0
    for part, micro_batches in zip(layout, parts):
        total = sum(weight(i) for share in part for i in share)
        mine = part[rank]
        scales.append(share_scales([sum(weight(mine[k - offset]) for k in micro) if token_mean else len(micro)
                                    for micro in micro_batches], total, ranks))
        offset += len(mine)
    return scales
