"""Length-grouped batches, the padding id, and the typed token batches handed to the training step."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import TypeVar

import torch

B = TypeVar("B", bound="TokenBatch")


@dataclass
class TokenBatch:
    """Right-padded token rows."""

    input_ids: torch.Tensor
    """[N, S] token ids, padding after the last real token."""
    attention_mask: torch.Tensor
    """[N, S] bool, True on real tokens."""

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self: B, device: torch.device | str) -> B:
        """Every tensor field on ``device``."""
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in self._tensor_fields()})

    def position_ids(self) -> torch.Tensor:
        """[N, S] positions 0..S-1 of every row (right padding keeps real tokens at their positions)."""
        return torch.arange(self.input_ids.shape[1], device=self.input_ids.device).expand_as(self.input_ids)

    def rows(self: B, start: int, stop: int) -> B:
        """Rows [start, stop) of every tensor field (other fields are shared)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[start:stop] for name in self._tensor_fields()})

    def select(self: B, indices: list[int], width: int) -> B:
        """Rows ``indices`` (in that order) of every tensor field, cut to ``width`` tokens: a micro-batch padded to
        its own longest row. Fields narrower than input_ids (the shifted frame, S - 1) keep their offset."""
        total = self.input_ids.shape[1]
        index = torch.tensor(indices, dtype=torch.long)

        def cut(value: torch.Tensor) -> torch.Tensor:
            value = value[index.to(value.device)]
            return value[:, : width - (total - value.shape[1])] if value.dim() > 1 else value

        return dataclasses.replace(self, **{name: cut(getattr(self, name)) for name in self._tensor_fields()})

    def split(self: B, rows_per_part: int) -> list[B]:
        """Consecutive parts of ``rows_per_part`` rows (the row count must divide evenly)."""
        total = self.input_ids.shape[0]
        if total % rows_per_part:
            raise ValueError(f"{total} rows do not split into parts of {rows_per_part}")
        return [self.rows(i, i + rows_per_part) for i in range(0, total, rows_per_part)]


@dataclass
class PairBatch(TokenBatch):
    """Preference pairs: row 2i is the chosen and row 2i+1 the rejected conversation of pair i."""

    loss_scale: float = 1.0
    """Of a token-budget micro-batch: its share of the global batch x micro-batches x data-parallel ranks (1 for
    fixed micro-batches): turns its mean loss into its part of the global mean after Megatron's averaging."""


@dataclass
class PromptTargetBatch(TokenBatch):
    """Prompts (each ending with the generation prompt) and the value each should predict."""

    targets: torch.Tensor
    """[N] fp32 regression target of V(x): the mean frozen-RM reward of the prompt's responses."""
    loss_scale: float = 1.0
    """Of a token-budget micro-batch: its share of the global batch x micro-batches x data-parallel ranks (1 for
    fixed micro-batches): turns its mean loss into its part of the global mean after Megatron's averaging."""


@dataclass
class ResponseGroupBatch(TokenBatch):
    """Prompts with G response slots each (row i * G + j is response j of prompt i), for a reward-model update on
    rollouts: its loss scores the rows, partitions each group and trains on the partition, all from one forward.

    Micro-batches must split at group boundaries (``split`` by a multiple of ``group_size``).
    """

    prompt_lengths: torch.Tensor
    """[N] tokens of each row's prompt: V(x) is read at position prompt_length - 1."""
    valid: torch.Tensor
    """[N] bool, a real response in the slot: it is scored."""
    trained: torch.Tensor
    """[N] bool, a valid response the update learns from (without the truncated ones under
    reward.update_skips_truncated)."""
    group_size: int
    """G, response slots per prompt."""
    threshold: float
    """mu(t) of the curriculum filter the loss partitions each group with (1/2 keeps every response)."""
    sum_scale: float
    """Micro-batches x data-parallel ranks: undoes Megatron's average over both, so that the reward term's
    gradient is the batch's sum; the update divides it by the batch's count (|B~|, or pairs) after the pass."""
    value_scale: float
    """(micro-batches x data-parallel ranks) / prompts with a trained response in the whole batch, for eq. 21
    (a count known before the pass)."""
    grades: torch.Tensor | None = None
    """[N] a verifier's grade of each slot (reward.verifier), for a strategy whose pairs the truth labels; None
    otherwise."""


@dataclass
class ScoredRowBatch(TokenBatch):
    """Rows of a token-budget reward-model update on rollouts (a group may span micro-batches): each row's R is
    read at its last token and V at its prompt's last token, and the pass backpropagates the cached gradients of
    the whole batch's loss with respect to them."""

    prompt_lengths: torch.Tensor
    """[N] tokens of each row's prompt."""
    reward_grad: torch.Tensor
    """[N] fp32 dJ/dR of each row (0 in the scoring pass)."""
    value_grad: torch.Tensor
    """[N] fp32 dJ/dV carried by one row of each group (0 elsewhere and in the scoring pass)."""
    loss_scale: float = 1.0
    """Micro-batches x data-parallel ranks: undoes Megatron's average over both."""


@dataclass
class DemonstrationBatch(TokenBatch):
    """Prompt + response rows of supervised fine-tuning."""

    loss_mask: torch.Tensor
    """[N, S - 1] bool, True where token t + 1 is a response token (shifted frame, as in PolicyBatch)."""
    loss_scale: float = 1.0
    """Of a token-budget micro-batch: its share of the global batch x micro-batches x data-parallel ranks (1 for
    fixed micro-batches): turns its mean loss into its part of the global mean after Megatron's averaging."""


@dataclass
class PolicyBatch(TokenBatch):
    """Prompt + response rows of the policy update. Token tensors of width S - 1 are in the shifted frame:
    position t scores token t + 1."""

    loss_mask: torch.Tensor
    """[N, S - 1] bool, True where token t + 1 is a response token (filler rows: all False)."""
    advantages: torch.Tensor
    """[N, S - 1] fp32 advantage of each response token (constant along a response for outcome rewards)."""
    old_logp: torch.Tensor | None
    """[N, S - 1] fp32 log-probs under the policy that sampled the rollouts (before this step's update); None when
    the update takes one optimizer step on fresh rollouts: its own forward is then that policy's (detached)."""
    ref_logp: torch.Tensor | None
    """[N, S - 1] fp32 log-probs under the frozen reference policy; None without one (the KL term is off)."""
    loss_scale: float = 1.0
    """(micro-batches x data-parallel ranks) x this micro-batch's share of the whole mini-batch's tokens (or
    sequences): turns a micro-batch mean into its part of the global mean after Megatron's averaging."""
    is_weights: torch.Tensor | None = None
    """[N, S - 1] fp32 rollout-correction IS weights multiplied into each token's loss; None without them."""


@dataclass
class ImplicitPrmBatch(TokenBatch):
    """Prompt + response rows of PRIME's implicit-PRM update, in the policy's shifted frame (position t scores
    token t + 1)."""

    loss_mask: torch.Tensor
    """[N, S - 1] bool, True where token t + 1 is a response token (filler rows: all False)."""
    ref_logp: torch.Tensor
    """[N, S - 1] fp32 log-probs under the PRM's frozen reference."""
    labels: torch.Tensor
    """[N] fp32 outcome label of each row's response in [0, 1] (0 on filler rows)."""
    loss_scale: torch.Tensor
    """[N] fp32 weight of each row: (micro-batches x data-parallel ranks) / rows of the whole batch, 0 on filler
    rows, so that Megatron's averaging yields the batch's mean loss."""


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id (0 when it has none: padding is masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group_factor: int = 32) -> list[list[int]]:
    """Indices in batches of ``batch_size`` with similar lengths, in a seeded random order.

    Shuffles, cuts into windows of ``group_factor`` batches, sorts each window by length, cuts it into batches
    and shuffles the batch order: little padding, no length curriculum. An incomplete last batch is dropped.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group_factor
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: lengths[i])
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches
