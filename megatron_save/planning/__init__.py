"""Planning a run before it starts: per-GPU memory of each phase of a stage-3 step (or of a one-model stage) at a
layout, from Hugging Face config numbers alone, and the search for settings that fit."""

from megatron_save.planning.memory import (
    PHASES,
    Architecture,
    MemoryLayout,
    MemoryPlan,
    PhasePlan,
    Recompute,
    architecture_from_hf,
    candidate_layouts,
    layout_problems,
    memory_refusal,
    parse_bytes,
    phase_table,
    plan_memory,
    plan_training,
    search_fits,
)

__all__ = [
    "PHASES",
    "Architecture",
    "MemoryLayout",
    "MemoryPlan",
    "PhasePlan",
    "Recompute",
    "architecture_from_hf",
    "candidate_layouts",
    "layout_problems",
    "memory_refusal",
    "parse_bytes",
    "phase_table",
    "plan_memory",
    "plan_training",
    "search_fits",
]
