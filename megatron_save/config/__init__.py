"""Typed configs: one dataclass per component, loaded from YAML with ``key=value`` overrides."""

from megatron_save.config.loading import ConfigError, load_config, merge_config
from megatron_save.config.memory_check import MemoryCheckSettings
from megatron_save.config.parallel import ParallelConfig
from megatron_save.config.recompute import RecomputeSettings, check_recompute

__all__ = ["ConfigError", "MemoryCheckSettings", "ParallelConfig", "RecomputeSettings",
           "check_recompute", "load_config", "merge_config"]
