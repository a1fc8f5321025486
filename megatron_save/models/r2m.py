"""R2M's policy-feedback head (arXiv 2601.22664, eqs. 3-4): sequence-to-token cross-attention from the reward
model's last-token state to the policy's last-layer hidden states, a time-step weighted combination, and the
reward head. The reward model's backbone stays frozen; only this module learns."""

from __future__ import annotations

import copy
import math

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from torch import nn


class R2MHead(MegatronModule):
    """Replicated on every rank (it is small: about 4 x hidden x width parameters), in fp32."""

    def __init__(self, config, reward_hidden: int, policy_hidden: int, width: int, reward_head: torch.Tensor,
                 seed: int):
        config = copy.copy(config)  # its own config: Megatron DDP hooks are set on it
        config.bf16, config.fp16, config.params_dtype = False, False, torch.float32
        super().__init__(config)
        self.width = width
        self.query = nn.Linear(reward_hidden, width, bias=False)
        self.key = nn.Linear(policy_hidden, width, bias=False)
        self.value = nn.Linear(policy_hidden, width, bias=False)
        self.out = nn.Linear(width, reward_hidden, bias=False)
        self.reward_head = nn.Linear(reward_hidden, 1, bias=False)
        # Every rank must start from the same weights: initialise from a seeded generator of its own (the global
        # RNG differs between ranks once Megatron has seeded each tensor-parallel rank).
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.query, self.key, self.value, self.out):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)  # nn.Linear's default
            self.reward_head.weight.copy_(reward_head.reshape(1, reward_hidden))
        # Each pipeline stage holds a copy: Megatron counts parameters marked ``shared`` (as it does the last stage's
        # tied embedding) only once in the gradient norm, so clipping is the same at any pipeline size.
        if parallel_state.get_pipeline_model_parallel_rank() != 0:
            for param in self.parameters():
                param.shared = True

    def forward(self, reward_state: torch.Tensor, policy_hidden: torch.Tensor, policy_mask: torch.Tensor,
                omega: float) -> torch.Tensor:
        """reward_state [N, Dm] (the RM's last-token state), policy_hidden [N, S, Dp], policy_mask [N, S] bool,
        omega the weight of reward_state (eq. 4) -> rewards [N]."""
        query = self.query(reward_state)[:, None, :]  # [N, 1, d]
        keys, values = self.key(policy_hidden), self.value(policy_hidden)  # [N, S, d]
        scores = (query @ keys.transpose(1, 2)) / math.sqrt(self.width)  # [N, 1, S]
        attention = torch.softmax(scores.masked_fill(~policy_mask[:, None, :], float("-inf")), dim=-1)
        aggregated = self.out((attention @ values)[:, 0])  # [N, Dm], eq. 3
        combined = (1.0 - omega) * aggregated + omega * reward_state  # eq. 4
        return self.reward_head(combined)[:, 0]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # Every rank holds the whole module: one main replica (all-zero replica id) writes each tensor.
        replica = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
                   parallel_state.get_data_parallel_rank())
        return {f"{prefix}{name}": ShardedTensor.from_rank_offsets(f"{prefix}{name}", tensor, replica_id=replica)
                for name, tensor in self.state_dict(keep_vars=True).items()}
