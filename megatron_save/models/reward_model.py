"""Scalar-head reward model: a Megatron GPT backbone whose last stage reads scalars instead of vocab logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from torch import nn
from torch.nn import functional as F


class ScalarHeads(nn.Module):
    """Per-token reward (and optional value) scalars from the final hidden states, computed in fp32.

    Stands where GPTModel keeps its vocab projection, so Megatron's own forward and pipeline schedules
    drive it. The heads are replicated on every tensor-parallel rank of the last pipeline stage.
    The value head reads a detached hidden state: it never sends gradient into the backbone.
    The head weights are stored in the model's dtype like every other weight (Megatron's mixed-precision
    optimizer keeps their fp32 main copies and checkpoints only models of one dtype) and upcast for the product.
    """

    def __init__(self, hidden_size: int, value_head: bool, dtype: torch.dtype):
        super().__init__()
        self.reward_head = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
        self.value_head = nn.Linear(hidden_size, 1, bias=False, dtype=dtype) if value_head else None

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        # hidden_states: [S, B, H] -> scores: [S, B, 1] (reward) or [S, B, 2] (reward, value)
        hidden = hidden_states.float()
        scores = [F.linear(hidden, self.reward_head.weight.float())]
        if self.value_head is not None:
            scores.append(F.linear(hidden.detach(), self.value_head.weight.float()))
        return torch.cat(scores, dim=-1), None


class RewardGPTModel(GPTModel):
    """GPTModel with ScalarHeads in place of the vocab projection; forward gives [B, S, 1 or 2] scores."""

    def __init__(self, *args, value_head: bool = False, **kwargs):
        kwargs["share_embeddings_and_output_weights"] = False
        super().__init__(*args, **kwargs)
        self.has_value_head = value_head
        if self.post_process:
            self.output_layer = ScalarHeads(self.config.hidden_size, value_head=value_head,
                                            dtype=self.config.params_dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # LanguageModule.sharded_state_dict expects a vocab ``output_layer.weight``; the scalar heads are plain
        # replicated tensors, which MegatronModule's default handles.
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)


@dataclass
class SequenceScores:
    """Scalar outputs of the reward model for N sequences."""

    rewards: torch.Tensor
    """[N] fp32 R(x, y), read at each sequence's last real token."""
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
