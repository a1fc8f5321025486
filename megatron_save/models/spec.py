"""Layer spec per backend: Transformer Engine on GPU when importable, else Megatron-Core's local modules; and the
one translation between the two specs' parameter names.

Transformer Engine fuses each layer norm that precedes a linear layer into it (``TELayerNormColumnParallelLinear``):
the local spec's ``input_layernorm.weight`` is TE's ``self_attention.linear_qkv.layer_norm_weight``, and in a dense
layer ``pre_mlp_layernorm.weight`` is ``mlp.linear_fc1.layer_norm_weight`` (a MoE layer keeps its pre-MLP norm as a
module of its own). Megatron-Core declares this correspondence itself: the local layer spec's
``sharded_state_dict_keys_map`` saves local-spec checkpoints under TE's names so that either spec loads them.
:func:`local_parameter_name` inverts that map, read from the installed megatron-core; everything that matches
parameters by name (the HF mappings, weight sync, export) speaks the local spec's names through it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from enum import Enum

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec


class SpecBackend(str, Enum):
    """Which implementation of the transformer layer to build."""

    AUTO = "auto"
    TRANSFORMER_ENGINE = "te"
    LOCAL = "local"


@functools.cache
def transformer_engine_import_error() -> str | None:
    """None when Transformer Engine's PyTorch API imports in this process, else why not (not installed, or its
    import failed: a missing CUDA library, a build for another torch). Every decision about TE goes through here
    (:func:`transformer_engine_available`): a package that importlib.util.find_spec finds may still fail to
    import, and megatron-core then builds without it while a find_spec check would pick the TE spec."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure of the import means TE cannot be used
        return f"{type(error).__name__}: {error}"
    return None


def transformer_engine_available() -> bool:
    """True when Transformer Engine can be used: CUDA present and TE imports (transformer_engine_import_error)."""
    return torch.cuda.is_available() and transformer_engine_import_error() is None


def transformer_engine_missing() -> str | None:
    """Why Transformer Engine cannot be used here (no CUDA, or the import's failure), or None when it can: the
    reason a TE-only test or check gives when it skips."""
    if not torch.cuda.is_available():
        return "Transformer Engine needs CUDA: not available here"
    error = transformer_engine_import_error()
    return None if error is None else f"Transformer Engine does not import here ({error})"


def resolve_backend(backend: SpecBackend | str) -> SpecBackend:
    """AUTO becomes TE on GPU with TE installed, LOCAL otherwise (GPU without TE, and every CPU run)."""
    backend = SpecBackend(backend)
    if backend is SpecBackend.AUTO:
        return SpecBackend.TRANSFORMER_ENGINE if transformer_engine_available() else SpecBackend.LOCAL
    if backend is SpecBackend.TRANSFORMER_ENGINE and not transformer_engine_available():
        raise ValueError(f"spec backend 'te': {transformer_engine_missing()}; use 'local' or 'auto'")
    return backend


def layer_spec(backend: SpecBackend | str, qk_layernorm: bool, num_experts: int | None = None) -> ModuleSpec:
    """The GPT layer ModuleSpec with RMSNorm (set in the TransformerConfig), optional q/k norm, and with
    ``num_experts`` a routed-experts MLP (one module per expert: ``mlp.experts.local_experts.<i>``).

    On CPU the local spec runs through the CPU compatibility layer (``megatron_save.distributed.cpu_compat``).
    """
    if resolve_backend(backend) is SpecBackend.TRANSFORMER_ENGINE:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return with_local_checkpoint_keys(get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm))
    return _local_layer_spec(qk_layernorm, num_experts)


def _local_layer_spec(qk_layernorm: bool, num_experts: int | None = None) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm,
                                    normalization="RMSNorm")


@functools.cache
def local_checkpoint_keys() -> dict[str, str]:
    """Megatron-Core's map from the local layer spec's norm modules to the names TE's fused layers give their
    weights, as layer-relative prefixes: ``{"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}`` (the local spec's ``sharded_state_dict_keys_map``)."""
    keys = dict(_local_layer_spec(qk_layernorm=False).submodules.sharded_state_dict_keys_map)
    if not keys:
        raise RuntimeError("this megatron-core's local layer spec declares no sharded_state_dict_keys_map: the "
                           "translation between local and Transformer Engine parameter names needs it")
    return keys


# The layer-relative part of a parameter name: "<...>layers.<i>." then the rest.
_IN_LAYER = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+\.)(?P<rest>.+)$")


def local_parameter_name(name: str) -> str:
    """A parameter's name in a model of either spec -> its name in the local spec (local names come back as they
    are): ``decoder.layers.3.self_attention.linear_qkv.layer_norm_weight`` -> ``decoder.layers.3.input_layernorm
    .weight``."""
    match = _IN_LAYER.match(name)
    if match is None:
        return name
    rest = match["rest"]
    for local, fused in local_checkpoint_keys().items():
        if rest.startswith(fused):
            return f"{match['layer']}{local}{rest[len(fused):]}"
    return name


def with_local_checkpoint_keys(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` saving every norm that it keeps as a module of its own under the checkpoint key that the local spec
    gives that norm.

    A TE MoE layer fuses the input norm into ``linear_qkv`` but keeps ``pre_mlp_layernorm`` (no linear layer follows
    it directly: the router does), while the local spec saves that norm as ``mlp.linear_fc1.layer_norm_weight``;
    without this, a checkpoint of either spec would miss a key in the other.
    """
    submodules = spec.submodules
    kept = {local: fused for local, fused in local_checkpoint_keys().items()
            if not _is_identity(getattr(submodules, local.rstrip("."), None))}
    if not kept:
        return spec
    keys = {**submodules.sharded_state_dict_keys_map, **kept}
    return dataclasses.replace(spec, submodules=dataclasses.replace(submodules, sharded_state_dict_keys_map=keys))


def _is_identity(submodule: object) -> bool:
    """Whether a spec slot builds nothing (no module, hence no parameter of its own)."""
    return submodule is None or submodule is IdentityOp or getattr(submodule, "module", None) is IdentityOp
