"""How a job is laid out over processes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Tensor / pipeline / expert parallel layout; the data-parallel size is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size: ranks that split every weight matrix of a layer."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size: ranks that each hold a contiguous slice of the layers."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism: norms and residuals of each layer on 1 / TP of the sequence (activation
    memory / TP); batches are padded to a multiple of TP. No effect at TP=1; required by MoE models at TP > 1."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size (MoE models): ranks that each hold num_experts / EP of every layer's experts, tokens
    exchanged all-to-all; laid over data-parallel (and context) ranks, so it divides world / (TP x PP)."""
    expert_tensor_parallel_size: int = 1
    """Tensor-parallel size inside each expert (MoE models); 1 keeps experts whole, as large MoE runs do."""
    backend: str = "auto"
    """torch.distributed backend: ``auto`` (nccl with CUDA, gloo without), ``nccl`` or ``gloo``."""
    seed: int = 1234
    """Seed of Megatron's model-parallel RNG tracker (dropout and initialisation)."""
    timeout_minutes: float = 30.0
    """Collective timeout of every process group, Megatron's included: a rank that waits longer for the others
    (a stalled or dead rank) fails with a timeout error, and torchrun ends the job."""


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """The --tp / --pp / --ep / --etp options of a tool that runs under torchrun at a model-parallel layout."""
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    parser.add_argument("--etp", type=int, default=1, help="expert tensor-parallel size (MoE models)")


def layout_from_arguments(args: argparse.Namespace, **settings) -> ParallelConfig:
    """The ParallelConfig of parsed ``add_layout_arguments`` options (plus any other field in ``settings``)."""
    return ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                          expert_model_parallel_size=args.ep, expert_tensor_parallel_size=args.etp, **settings)
