"""Typed configs: one dataclass per component, loaded from YAML with ``key=value`` overrides."""

from megatron_save.config.loading import load_config
from megatron_save.config.parallel import ParallelConfig
from megatron_save.config.recompute import RecomputeSettings, check_recompute

__all__ = ["ParallelConfig", "RecomputeSettings", "check_recompute", "load_config"]
