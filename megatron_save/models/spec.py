"""Layer spec per backend: Transformer Engine on GPU when importable, else Megatron-Core's local modules."""

from __future__ import annotations

import importlib.util
from enum import Enum

import torch
from megatron.core.transformer.spec_utils import ModuleSpec


class SpecBackend(str, Enum):
    """Which implementation of the transformer layer to build."""

    AUTO = "auto"
    TRANSFORMER_ENGINE = "te"
    LOCAL = "local"


def transformer_engine_available() -> bool:
    """True when Transformer Engine can be used: CUDA present and the package importable."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(backend: SpecBackend | str) -> SpecBackend:
    """AUTO becomes TE on GPU with TE installed, LOCAL otherwise (GPU without TE, and every CPU run)."""
    backend = SpecBackend(backend)
    if backend is SpecBackend.AUTO:
        return SpecBackend.TRANSFORMER_ENGINE if transformer_engine_available() else SpecBackend.LOCAL
    if backend is SpecBackend.TRANSFORMER_ENGINE and not transformer_engine_available():
        raise ValueError("spec backend 'te' needs CUDA and the transformer-engine package; use 'local' or 'auto'")
    return backend


def layer_spec(backend: SpecBackend | str, qk_layernorm: bool, num_experts: int | None = None) -> ModuleSpec:
    """The GPT layer ModuleSpec with RMSNorm (set in the TransformerConfig), optional q/k norm, and with
    ``num_experts`` a routed-experts MLP (one module per expert: ``mlp.experts.local_experts.<i>``).

    On CPU the local spec runs through the CPU compatibility layer (``megatron_save.distributed.cpu_compat``).
    """
    if resolve_backend(backend) is SpecBackend.TRANSFORMER_ENGINE:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                           qk_layernorm=qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm,
                                    normalization="RMSNorm")
