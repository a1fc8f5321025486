"""Policy-side reads of a Megatron causal LM: per-token log-probs with Megatron's vocab-parallel cross entropy
(the full vocabulary is never gathered) and the per-token entropy, on the last pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_save.models.forward import broadcast_from_last_stage, forward_micro_batches, pipeline_forward


@dataclass
class TokenLogProbs:
    """Per-token statistics of N sequences under the policy; position t scores token t + 1."""

    logp: torch.Tensor
    """[N, S - 1] fp32 log pi(token_{t+1} | tokens_<=t)."""
    entropy: torch.Tensor
    """[N, S - 1] fp32 entropy of pi(. | tokens_<=t)."""


def token_logprobs(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
                   ) -> torch.Tensor:
    """log p(label) per position under softmax(logits / temperature), from this rank's vocabulary shard.
    [b, S, V / TP], [b, S] -> [b, S] fp32 (the division happens in fp32: bf16 logits are not rounded again)."""
    logits = vocab_parallel_logits.float()
    # Megatron's kernel may work in place on an fp32 input: hand it a tensor of its own.
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    return -vocab_parallel_cross_entropy(logits, labels)


@torch.no_grad()
def vocab_parallel_entropy(vocab_parallel_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the whole (TP-sharded) vocabulary. [b, S, V / TP] -> [b, S]
    fp32."""
    group = parallel_state.get_tensor_model_parallel_group()
    logits = vocab_parallel_logits.float() / temperature
    maximum = logits.max(dim=-1, keepdim=True).values
    dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - maximum
    exp = shifted.exp()
    sums = torch.stack([exp.sum(dim=-1), (exp * shifted).sum(dim=-1)])  # [2, b, S]: Z and sum e^x x
    dist.all_reduce(sums, group=group)
    partition, weighted = sums[0], sums[1]
    return partition.log() - weighted / partition  # log Z - E[x]


def _logp_and_entropy(temperature: float, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[b, S] tokens, [b, S, V / TP] logits -> [b, S - 1, 2] (log-prob of the next token, entropy), of the
    distribution softmax(logits / temperature)."""
    logits = logits[:, :-1]
    logp = token_logprobs(logits, tokens[:, 1:], temperature)
    return torch.stack([logp, vocab_parallel_entropy(logits, temperature)], dim=-1)


def sequence_logprobs(model: Any, input_ids: torch.Tensor, micro_batch_size: int, temperature: float = 1.0
                      ) -> TokenLogProbs:
    """Per-token log-probs and entropies of right-padded sequences [N, S], on every rank (forward only), under
    the policy's logits divided by ``temperature`` (RL scores the distribution its rollouts were sampled from)."""
    stats = pipeline_forward(model, input_ids, micro_batch_size, postprocess=partial(_logp_and_entropy, temperature))
    stats = broadcast_from_last_stage(stats, (input_ids.shape[0], input_ids.shape[1] - 1, 2), torch.float32)
    return TokenLogProbs(logp=stats[..., 0], entropy=stats[..., 1])


def micro_batch_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, parts: list[list[int]],
                         temperature: float = 1.0) -> TokenLogProbs:
    """``sequence_logprobs`` over token-budget micro-batches: ``parts`` lists the rows of each micro-batch (every
    row of input_ids [N, S] exactly once), each forwarded at its own longest row; log-probs and entropies
    [N, S - 1] on every rank, 0 past a row's micro-batch width."""
    widths = [int(attention_mask[part].sum(dim=1).max()) for part in parts]
    outputs = forward_micro_batches(model, [input_ids[part][:, :width] for part, width in zip(parts, widths)],
                                    postprocess=partial(_logp_and_entropy, temperature))
    stats = None
    if outputs is not None:
        stats = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, 2, device=outputs[0].device)
        for part, output in zip(parts, outputs):
            stats[torch.tensor(part, device=stats.device), : output.shape[1]] = output.float()
    stats = broadcast_from_last_stage(stats, (input_ids.shape[0], input_ids.shape[1] - 1, 2), torch.float32)
    return TokenLogProbs(logp=stats[..., 0], entropy=stats[..., 1])
