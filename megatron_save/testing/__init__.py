"""Tiny models and fixtures built locally from configs (nothing is downloaded); shared by tests and tools."""

from megatron_save.testing.tiny_models import (
    SCALES,
    TINY_FAMILIES,
    TINY_MOE_FAMILIES,
    save_tiny_hf_model,
    tiny_hf_config,
    tiny_tokenizer,
)

__all__ = ["SCALES", "TINY_FAMILIES", "TINY_MOE_FAMILIES", "save_tiny_hf_model", "tiny_hf_config", "tiny_tokenizer"]
