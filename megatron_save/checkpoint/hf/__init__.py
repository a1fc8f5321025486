"""Hugging Face <-> Megatron weight mappings (used by tools/ and by rollout weight sync).

The families they map, and the lookup of a config's family, are in ``megatron_save.models.families``.
"""

from megatron_save.checkpoint.hf.common import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR, ParamMapping, param_mappings

__all__ = ["VALUE_HEAD_FILE", "VALUE_HEAD_TENSOR", "ParamMapping", "param_mappings"]
