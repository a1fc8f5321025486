"""Typed configs: one dataclass per component, loaded from YAML with ``key=value`` overrides."""

from megatron_save.config.loading import load_config
from megatron_save.config.parallel import ParallelConfig

__all__ = ["ParallelConfig", "load_config"]
