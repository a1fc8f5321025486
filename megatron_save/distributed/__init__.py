"""torchrun start-up, Megatron process groups and the CPU compatibility layer."""

from megatron_save.distributed.init import (
    ModelShape,
    ParallelLayoutError,
    check_parallel_layout,
    compute_device,
    init_distributed,
    set_model_parallel,
    shutdown_distributed,
)

__all__ = [
    "ModelShape",
    "ParallelLayoutError",
    "check_parallel_layout",
    "compute_device",
    "init_distributed",
    "set_model_parallel",
    "shutdown_distributed",
]
