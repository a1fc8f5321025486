"""Megatron-Core models built from Hugging Face configs: causal LMs and scalar-head reward models."""

from megatron_save.models.builder import ModelKind, build_model
from megatron_save.models.gpt_config import GPTArgs, gpt_args_from_hf
from megatron_save.models.reward_model import RewardGPTModel, ScalarHeads
from megatron_save.models.spec import SpecBackend, layer_spec

__all__ = [
    "GPTArgs",
    "ModelKind",
    "RewardGPTModel",
    "ScalarHeads",
    "SpecBackend",
    "build_model",
    "gpt_args_from_hf",
    "layer_spec",
]
