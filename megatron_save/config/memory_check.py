"""The launch's check of the planned per-GPU peak (megatron_save/planning/memory.py) against the device: one
settings block shared by every stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MemoryCheckSettings:
    """memory_check: what a launch does with its memory plan before it builds a model."""

    enabled: bool = True
    """On a GPU, refuse to start when the planned per-GPU peak exceeds the device's memory less margin_gib (the
    refusal names the phase and settings that fit); false starts anyway, with a warning. On CPU the plan is only
    logged."""
    margin_gib: float = 6.0
    """GiB of each GPU the plan leaves free for what it does not count: the CUDA context, NCCL buffers, a
    layer's forward workspace and fragmentation."""
