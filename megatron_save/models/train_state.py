"""A model wrapped for training: Megatron DDP with its optimizer and LR schedule.

The type lives here, below checkpoint/ (which persists it) and trainers/ (which build and step it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass
class TrainState:
    """The model wrapped for training with its optimizer and LR schedule."""

    model: DistributedDataParallel
    """Megatron DDP wrapper around this rank's model stage."""
    optimizer: Any
    """Megatron optimizer (mixed precision on GPU, distributed when configured)."""
    scheduler: OptimizerParamScheduler
    """LR and weight-decay schedule, stepped once per optimizer step."""

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model."""
        return self.model.module
