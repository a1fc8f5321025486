"""Distributed checkpoints of models and runs, and HF <-> Megatron conversion."""

from megatron_save.checkpoint.model_checkpoint import (
    CheckpointMeta,
    build_model_from_checkpoint,
    load_model_checkpoint,
    read_checkpoint_meta,
    save_model_checkpoint,
)

__all__ = [
    "CheckpointMeta",
    "build_model_from_checkpoint",
    "load_model_checkpoint",
    "read_checkpoint_meta",
    "save_model_checkpoint",
]
