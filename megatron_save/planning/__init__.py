"""Planning a run before it starts: per-GPU memory of a stage-3 layout, from Hugging Face config numbers alone."""

from megatron_save.planning.memory import (
    Architecture,
    MemoryLayout,
    MemoryPlan,
    architecture_from_hf,
    candidate_layouts,
    layout_problems,
    parse_bytes,
    plan_memory,
)

__all__ = [
    "Architecture",
    "MemoryLayout",
    "MemoryPlan",
    "architecture_from_hf",
    "candidate_layouts",
    "layout_problems",
    "parse_bytes",
    "plan_memory",
]
