"""Rollout engines behind one protocol: generate G responses per prompt as token ids, take new policy weights."""

from megatron_save.rollout.engine import RolloutEngine, Rollouts, SamplingSettings
from megatron_save.rollout.transformers_engine import TransformersRolloutEngine
from megatron_save.rollout.vllm_engine import VLLMRolloutEngine, VLLMSettings

__all__ = [
    "RolloutEngine", "Rollouts", "SamplingSettings", "TransformersRolloutEngine", "VLLMRolloutEngine", "VLLMSettings",
]
