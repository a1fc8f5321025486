"""Scalar-head reward model: a Megatron GPT backbone whose last stage reads scalars instead of vocab logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from torch import nn
from torch.nn import functional as F


class _JoinHeads(torch.autograd.Function):
    """``torch.cat`` of the reward and value columns whose backward runs the reward head's and the backbone's
    only when the reward column's gradient is not all zero: a loss of the value head alone (a value-only
    micro-batch) then costs no backbone backward. With autograd's own cat the backbone would run its whole
    backward on zeros (Megatron's linear layers materialise a missing gradient as zeros), so the reward column
    joins the output detached and its graph is run from this backward when needed, a nested backward as Megatron's
    activation checkpointing does. Only where nothing upstream waits for a gradient: Megatron's pipeline schedule
    sends every stage's input gradient back."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, reward_graph: tuple[torch.Tensor]) -> torch.Tensor:
        # value: [S, B, 1]; reward_graph: ([S, B, 1] with its autograd graph, outside autograd's edges) -> [S, B, 2]
        ctx.reward = reward_graph[0]
        return torch.cat([ctx.reward.detach(), value], dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # grad: [S, B, 2]; the check costs one host sync per micro-batch (a NaN counts as non-zero)
        grad_reward = grad[..., :1]
        if bool(grad_reward.ne(0).any()):
            torch.autograd.backward(ctx.reward, grad_reward)
        ctx.reward = None
        return grad[..., 1:], None


class ScalarHeads(nn.Module):
    """Per-token reward (and optional value) scalars from the final hidden states, computed in fp32.

    Stands where GPTModel keeps its vocab projection, so Megatron's own forward and pipeline schedules
    drive it. The heads are replicated on every tensor-parallel rank of the last pipeline stage.
    The value head reads a detached hidden state: it never sends gradient into the backbone, and (with
    ``whole_model``) a value loss alone runs no backward of the backbone at all.
    The head weights are stored in the model's dtype like every other weight (Megatron's mixed-precision
    optimizer keeps their fp32 main copies and checkpoints only models of one dtype) and upcast for the product.
    """

    def __init__(self, hidden_size: int, value_head: bool, dtype: torch.dtype, whole_model: bool = True,
                 sequence_parallel: bool = False):
        super().__init__()
        self.reward_head = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
        self.value_head = nn.Linear(hidden_size, 1, bias=False, dtype=dtype) if value_head else None
        self.whole_model = whole_model
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        # hidden_states: [S, B, H] ([S / TP, B, H] under sequence parallelism) -> scores: [S, B, 1] (reward) or
        # [S, B, 2] (reward, value)
        if self.sequence_parallel:
            # The heads are replicated: every TP rank scores the whole sequence and keeps its own slice of the
            # gradient (a split, not a reduce-scatter, in backward).
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        hidden = hidden_states.float()
        reward = F.linear(hidden, self.reward_head.weight.float())
        if self.value_head is None:
            return reward, None
        value = F.linear(hidden.detach(), self.value_head.weight.float())
        if self.whole_model and torch.is_grad_enabled() and reward.requires_grad and value.requires_grad:
            return _JoinHeads.apply(value, (reward,)), None
        return torch.cat([reward, value], dim=-1), None


def reward_positions(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """[B, S] token ids -> [B, S] index q(p) at which the reward of the prefix ending at position p is read.

    transformers' ``*ForSequenceClassification`` reads a sequence's reward at its last token that is not
    ``config.pad_token_id`` (position 0 when every token is one): with pad = EOS, a sequence that ends in EOS
    is read at the token before its trailing EOS run. q(p) is that position within tokens 0..p; without a pad
    token, p itself.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # [B, S]
    if pad_token_id is None:
        return positions
    return torch.where(input_ids != pad_token_id, positions, 0).cummax(dim=1).values


def read_rewards_as_transformers(scores: torch.Tensor, input_ids: torch.Tensor,
                                 pad_token_id: int | None) -> torch.Tensor:
    """Per-token head outputs [B, S, heads] -> the same with the reward column at p replaced by the reward at
    ``reward_positions``' q(p): reading column 0 at a sequence's last real token then gives transformers'
    reward of that sequence, whatever the padding. The value column is left as it is."""
    if pad_token_id is None:
        return scores
    index = reward_positions(input_ids.to(scores.device), pad_token_id)[..., None]  # [B, S, 1]
    return torch.cat([scores[..., :1].gather(1, index), scores[..., 1:]], dim=-1)


class RewardGPTModel(GPTModel):
    """GPTModel with ScalarHeads in place of the vocab projection; forward gives [B, S, 1 or 2] scores.

    Column 0 at position p is the reward of the prefix ending at p as transformers reads it (at the prefix's last
    token that is not ``pad_token_id``, ``read_rewards_as_transformers``), so every reader that takes it at a
    sequence's last real token (scoring, stages 1-3, parity) gets what the exported classifier gives.
    """

    def __init__(self, *args, value_head: bool = False, pad_token_id: int | None = None, **kwargs):
        kwargs["share_embeddings_and_output_weights"] = False
        super().__init__(*args, **kwargs)
        self.has_value_head = value_head
        self.pad_token_id = pad_token_id
        if self.post_process:
            # With stages before this one, the schedule waits for its input's gradient even after a value loss;
            # with sequence parallelism the tensor-parallel ranks would check different tokens, and one could skip
            # a backward whose collectives another runs (so could expert-parallel ranks, which hold different
            # data). A MoE backbone's load-balancing loss gives it a gradient of its own in every micro-batch.
            self.output_layer = ScalarHeads(self.config.hidden_size, value_head=value_head,
                                            dtype=self.config.params_dtype,
                                            whole_model=(self.pre_process and not self.config.sequence_parallel
                                                         and not self.config.num_moe_experts),
                                            sequence_parallel=self.config.sequence_parallel)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                *args, **kwargs) -> torch.Tensor:
        """GPTModel's forward; on the last stage the reward column is re-read by the tokens, which every pipeline
        stage is given (input_ids [B, S] -> scores [B, S, heads])."""
        output = super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        if not self.post_process or self.pad_token_id is None:
            return output
        if input_ids is None:
            raise ValueError("the reward model reads each reward by its tokens: pass input_ids to the last stage")
        return read_rewards_as_transformers(output, input_ids, self.pad_token_id)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # LanguageModule.sharded_state_dict expects a vocab ``output_layer.weight``; the scalar heads are plain
        # replicated tensors, which MegatronModule's default handles.
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)


@dataclass
class SequenceScores:
    """Scalar outputs of the reward model for N sequences."""

    rewards: torch.Tensor
    """[N] fp32 R(x, y), read where transformers reads it (``reward_positions``)."""
    values: torch.Tensor | None
    """[N] fp32 V(x), read at each sequence's last prompt token; None without a value head."""


def read_scores(
    scores: torch.Tensor, last_index: torch.Tensor, prompt_last_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token head outputs [N, S, 2] -> (R [N] at ``last_index``, V [N] at ``prompt_last_index``).

    Attention is causal, so the hidden state at the last prompt token has seen only the prompt: V(x) comes out
    of the same forward that scores the response.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, last_index, 0], scores[rows, prompt_last_index, 1]
