"""Process-group start-up for ``torchrun`` launches (NCCL on GPU, gloo on CPU) and Megatron parallel state."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from megatron_save.config.parallel import ParallelConfig
from megatron_save.distributed import cpu_compat
from megatron_save.utils.logging import get_logger

logger = get_logger(__name__)


class ParallelLayoutError(ValueError):
    """A parallel layout that cannot split the model or the world; raised before any process group exists."""


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions a parallel layout has to divide."""

    num_layers: int
    """Transformer layers, split over pipeline stages."""
    num_attention_heads: int
    """Query heads, split over tensor-parallel ranks."""
    num_query_groups: int
    """Key/value heads (GQA groups), split over tensor-parallel ranks."""
    vocab_size: int
    """Rows of the embedding table, split over tensor-parallel ranks."""
    source: str = ""
    """The model these dimensions belong to (a checkpoint or config path), named in a refusal."""
    num_experts: int = 0
    """Routed experts per layer, split over expert-parallel ranks; 0 for a dense model, which any expert layout
    leaves alone (a MoE policy's EP with a dense reward model)."""


def check_parallel_layout(parallel: ParallelConfig, world_size: int, shape: ModelShape | None = None) -> None:
    """Raises ParallelLayoutError naming the setting when TP / PP cannot lay the model over ``world_size``."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ParallelLayoutError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ParallelLayoutError(
            f"world size {world_size} is not a multiple of tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}"
        )
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size
    if ep < 1 or etp < 1:
        raise ParallelLayoutError(f"expert_model_parallel_size={ep} and expert_tensor_parallel_size={etp} must be >= 1")
    if world_size % (etp * ep * pp) != 0:
        raise ParallelLayoutError(
            f"world size {world_size} is not a multiple of expert_tensor_parallel_size x expert_model_parallel_size x "
            f"pipeline_model_parallel_size = {etp} x {ep} x {pp} = {etp * ep * pp}"
        )
    if shape is None:
        return
    named = f"{shape.source}: " if shape.source else ""
    if shape.num_experts and shape.num_experts % ep != 0:
        raise ParallelLayoutError(f"{named}expert_model_parallel_size={ep} does not divide the {shape.num_experts} "
                                  "experts")
    for size, count, what in ((tp, shape.num_attention_heads, "attention heads"),
                              (tp, shape.num_query_groups, "query groups (key/value heads)")):
        if count % size != 0:
            raise ParallelLayoutError(f"{named}tensor_model_parallel_size={size} does not divide the {count} {what}")
    if shape.vocab_size % tp != 0:
        raise ParallelLayoutError(
            f"{named}tensor_model_parallel_size={tp} does not divide the vocabulary size {shape.vocab_size}"
        )
    if shape.num_layers % pp != 0:
        raise ParallelLayoutError(
            f"{named}pipeline_model_parallel_size={pp} does not divide the {shape.num_layers} layers"
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous that has no MASTER_ADDR / MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(parallel: ParallelConfig, *shapes: ModelShape) -> None:
    """Starts torch.distributed from torchrun's environment (or as a world of one) and Megatron's groups.

    The layout is checked against every model the job will build (``shapes``) before any process group is
    created, so a bad layout fails fast on every rank with one ParallelLayoutError.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_parallel_layout(parallel, world_size)
    for shape in shapes:
        check_parallel_layout(parallel, world_size, shape)
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.install()
    if not dist.is_initialized():
        backend = parallel.backend if parallel.backend != "auto" else ("nccl" if cuda else "gloo")
        # Outside torchrun (a world of one: conversion tools, tests) pick a free local port without touching
        # os.environ, so child processes do not inherit an address that this process already holds.
        init_method = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{free_port()}"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # A gloo job on a GPU machine may run more processes than GPUs (the streamed export on host memory).
        if cuda and (backend == "nccl" or local_rank < torch.cuda.device_count()):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            timeout=timedelta(minutes=parallel.timeout_minutes),
        )
    set_model_parallel(parallel)


def set_model_parallel(parallel: ParallelConfig) -> None:
    """Lays Megatron's TP / PP / DP groups over the running world and seeds the model-parallel RNG.

    Groups that set_model_parallel already made for this TP x PP over this world are kept (models built on them
    stay usable, and re-initialising costs nothing); another layout replaces them, destroying the old ones.
    """
    global _megatron_layout
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    check_parallel_layout(parallel, dist.get_world_size())
    # The timeout is part of the key: Megatron's groups carry it from their creation.
    layout = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
              parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size, parallel.timeout_minutes)
    if not _has_megatron_layout(layout):
        _destroy_model_parallel()
        existing = set(_process_groups())
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=parallel.tensor_model_parallel_size,
                pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
                expert_model_parallel_size=parallel.expert_model_parallel_size,
                expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
                distributed_timeout_minutes=parallel.timeout_minutes,
            )
        finally:
            # Every group that appeared is Megatron's, including those of a call that failed half-way.
            _megatron_groups.extend(group for group in _process_groups() if group not in existing)
        _megatron_layout = (*layout, parallel_state.get_tensor_model_parallel_group())
    global _parallel_config
    _parallel_config = parallel
    model_parallel_cuda_manual_seed(parallel.seed)
    experts = ""
    if parallel.expert_model_parallel_size > 1 or parallel.expert_tensor_parallel_size > 1:
        experts = f"; experts: EP {parallel.expert_model_parallel_size} x ETP {parallel.expert_tensor_parallel_size}"
    logger.info(
        "parallel layout: world %d = TP %d x PP %d x DP %d%s (%s)",
        dist.get_world_size(),
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel_state.get_data_parallel_world_size(),
        experts,
        dist.get_backend(),
    )


def sequence_parallel() -> bool:
    """Whether models built now use sequence parallelism: the running layout asks for it and TP > 1."""
    from megatron.core import parallel_state

    return (_parallel_config is not None and _parallel_config.sequence_parallel
            and parallel_state.get_tensor_model_parallel_world_size() > 1)


def compute_device() -> torch.device:
    """Where this rank's model and batches live: its CUDA device, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def before_shutdown(callback: Callable[[], None]) -> None:
    """Has shutdown_distributed call ``callback`` first, while the process groups still live (last registered,
    first called): the teardown of something that joined them, such as an in-process vLLM engine."""
    _before_shutdown.append(callback)


def shutdown_distributed() -> None:
    """Runs the before_shutdown callbacks, then destroys Megatron's groups and the default process group (and with
    it every other group)."""
    while _before_shutdown:
        _before_shutdown.pop()()
    _destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


_before_shutdown: list[Callable[[], None]] = []
"""What shutdown_distributed calls before it destroys any process group (see before_shutdown)."""
_megatron_groups: list[dist.ProcessGroup] = []
"""The process groups that set_model_parallel's Megatron initialisations created and that may still be alive."""
_parallel_config: ParallelConfig | None = None
"""The layout set_model_parallel last laid out (its settings that make no process group: sequence parallelism)."""
_megatron_layout: tuple | None = None
"""(TP, PP, EP, ETP, timeout, Megatron's TP group) of the layout that _megatron_groups make; None when none."""


def _process_groups() -> list[dist.ProcessGroup]:
    """Every live process group of this process (the default one included); none before init_process_group."""
    return list(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else []


def _has_megatron_layout(layout: tuple) -> bool:
    """Whether Megatron's groups are still the live ones that set_model_parallel made for ``layout`` (TP, PP, EP,
    ETP, timeout in minutes).

    False when anything else re-initialised or destroyed them, or destroyed the world they were made in.
    """
    from megatron.core import parallel_state

    if _megatron_layout is None or _megatron_layout[:-1] != layout:
        return False
    if not parallel_state.model_parallel_is_initialized():
        return False
    live = set(_process_groups())
    return parallel_state.get_tensor_model_parallel_group() is _megatron_layout[-1] and all(
        group in live for group in _megatron_groups)


def _destroy_model_parallel() -> None:
    """Megatron's destroy_model_parallel, plus destroying the groups it only forgets.

    Megatron-Core's destroy_model_parallel sets its TP / PP / DP / embedding / ... groups to None but destroys
    only its gloo data-parallel groups: the other groups stay registered with torch.distributed, each holding
    its communicator (three threads for a gloo group), and a process that re-created the layout (a new layout,
    a conversion after training, tests in one process) piled up a set of groups per call. A few of its globals
    it does not even reset (the intra-partial data-parallel groups); those are cleared here too, so that once
    nothing else holds a destroyed group (a model built on it) its communicator and threads are freed.
    """
    global _megatron_layout
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    destroyed = list(_megatron_groups)
    live = set(_process_groups())
    while _megatron_groups:
        group = _megatron_groups.pop()
        if group in live and group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)
    for name, value in list(vars(parallel_state).items()):
        if isinstance(value, dist.ProcessGroup) and any(value is group for group in destroyed):
            setattr(parallel_state, name, None)
    _megatron_layout = None
