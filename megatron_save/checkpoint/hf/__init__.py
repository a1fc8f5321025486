"""Hugging Face <-> Megatron weight mappings, one module per family (used by tools/ and by rollout weight sync)."""

from __future__ import annotations

from typing import Any

from megatron_save.checkpoint.hf.common import (
    VALUE_HEAD_FILE,
    VALUE_HEAD_TENSOR,
    DecoderFamily,
    ParamMapping,
    UnsupportedModelError,
    check_supported,
    head_dim_of,
    param_mappings,
    rope_parameters,
)
from megatron_save.checkpoint.hf.llama import LLAMA
from megatron_save.checkpoint.hf.qwen2 import QWEN2
from megatron_save.checkpoint.hf.qwen3 import QWEN3

FAMILIES: dict[str, DecoderFamily] = {family.name: family for family in (LLAMA, QWEN2, QWEN3)}


def family_for(hf_config: Any) -> DecoderFamily:
    """The family of a transformers config; UnsupportedModelError names the model type and what is supported."""
    for family in FAMILIES.values():
        if hf_config.model_type in family.model_types:
            check_supported(family, hf_config)
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise UnsupportedModelError(
        f"unsupported model_type {hf_config.model_type!r} (architectures {getattr(hf_config, 'architectures', None)});"
        f" supported model types: {supported}"
    )


def is_reward_model(family: DecoderFamily, hf_config: Any) -> bool:
    """True for a single-label ``*ForSequenceClassification`` config, False for a causal LM.

    Raises UnsupportedModelError for any other architecture, or a classifier with more than one label.
    """
    architectures = getattr(hf_config, "architectures", None) or [family.causal_lm_architecture]
    architecture = architectures[0]
    if architecture == family.causal_lm_architecture:
        return False
    if architecture == family.reward_model_architecture:
        if hf_config.num_labels != 1:
            raise UnsupportedModelError(
                f"{architecture} with num_labels={hf_config.num_labels}: only single-label (scalar) reward models"
            )
        return True
    raise UnsupportedModelError(
        f"unsupported architecture {architecture!r}; the {family.name} family supports "
        f"{family.causal_lm_architecture} and {family.reward_model_architecture}"
    )


__all__ = [
    "VALUE_HEAD_FILE",
    "VALUE_HEAD_TENSOR",
    "FAMILIES",
    "DecoderFamily",
    "ParamMapping",
    "UnsupportedModelError",
    "family_for",
    "head_dim_of",
    "is_reward_model",
    "param_mappings",
    "rope_parameters",
]
