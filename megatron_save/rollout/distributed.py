"""Rollouts of a global prompt batch spread over data-parallel ranks, identical on every rank afterwards."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_save.rollout.engine import RolloutEngine, Rollouts, SamplingSettings


def is_rollout_rank() -> bool:
    """True on the first rank of each model-parallel (TP x PP) group: the rank that holds a rollout engine."""
    return dist.get_rank() == parallel_state.get_model_parallel_src_rank()


def concat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Rollouts of several prompt batches, in order, as one."""
    with_logprobs = all(p.logprobs is not None for p in parts)
    return Rollouts(
        prompt_ids=[p for part in parts for p in part.prompt_ids],
        response_ids=[r for part in parts for r in part.response_ids],
        truncated=[t for part in parts for t in part.truncated],
        logprobs=[lp for part in parts for lp in part.logprobs] if with_logprobs else None,
    )


def generate_data_parallel(engine: RolloutEngine | None, prompt_ids: list[list[int]], sampling: SamplingSettings,
                           seed: int) -> Rollouts:
    """Collective: data-parallel rank d samples prompts [d * B / DP, (d + 1) * B / DP) with seed ``seed + d`` on
    its rollout rank (``engine`` is None elsewhere), or on every rank of its model-parallel group for a
    collective engine (Megatron-Core's, sharded like the policy); the group receives the rollout rank's rollouts
    and the data-parallel shares are gathered, so every rank returns the same Rollouts for all B prompts.
    """
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if len(prompt_ids) % ranks:
        raise ValueError(f"{len(prompt_ids)} prompts do not split over {ranks} data-parallel ranks")
    share = len(prompt_ids) // ranks
    payload: list[Rollouts | None] = [None]
    if is_rollout_rank() or getattr(engine, "collective", False):
        if engine is None:
            raise RuntimeError("the rollout rank of this model-parallel group has no rollout engine")
        mine = prompt_ids[rank * share : (rank + 1) * share]
        rollouts = engine.generate(mine, dataclasses.replace(sampling, seed=seed + rank))
        payload = [rollouts if is_rollout_rank() else None]
    group = parallel_state.get_model_parallel_group()
    dist.broadcast_object_list(payload, src=parallel_state.get_model_parallel_src_rank(), group=group)
    parts: list[Rollouts | None] = [None] * ranks
    dist.all_gather_object(parts, payload[0], group=parallel_state.get_data_parallel_group())
    return concat_rollouts(parts)


def sync_weights(engine: RolloutEngine | None, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Collective weight sync: every rank drains the gather stream (it is a collective), rollout ranks load it."""
    if engine is not None:
        engine.update_weights(named_tensors)
    else:
        for _ in named_tensors:
            pass
