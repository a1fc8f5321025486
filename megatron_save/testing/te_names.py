"""Models that name their parameters as Transformer Engine's layer spec does, built where TE cannot be imported.

TE's ``TELayerNormColumnParallelLinear`` holds the norm in front of a linear layer as that layer's parameter
``layer_norm_weight``: the input norm lives in ``self_attention.linear_qkv``, a dense layer's pre-MLP norm in
``mlp.linear_fc1``; a MoE layer keeps ``pre_mlp_layernorm`` as a module (its router is no TE linear layer), which the
TE spec of ``megatron_save.models.spec.layer_spec`` saves under the local spec's checkpoint key.
:func:`with_te_parameter_names` re-homes a local-spec model's norm weights the same way, following TE's module
structure rather than the name translation that it exists to test: each weight becomes a parameter of the linear
layer and the norm keeps a plain reference to it, so forward, backward, DDP and checkpoints still work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_save.models.spec import with_local_checkpoint_keys

TE_FUSED_NORM = "layer_norm_weight"


def _move_norm_into(norm: torch.nn.Module, linear: torch.nn.Module) -> None:
    weight = norm._parameters.pop("weight")
    linear.register_parameter(TE_FUSED_NORM, weight)
    # A plain attribute, not a registered parameter: the norm still computes with it.
    object.__setattr__(norm, "weight", weight)


def with_te_parameter_names(model: Any) -> Any:
    """``model`` (a local-spec GPTModel or reward model, unwrapped) with its layers' parameters named and saved as
    the TE spec names and saves them; returns the same object."""
    for layer in model.decoder.layers:
        moe = hasattr(layer.mlp, "router")
        _move_norm_into(layer.input_layernorm, layer.self_attention.linear_qkv)
        if not moe:
            _move_norm_into(layer.pre_mlp_layernorm, layer.mlp.linear_fc1)
        # What layer_spec("te") declares: TE's own key map (empty without its op fuser) plus the local keys of the
        # norms TE keeps as modules.
        te_shaped = dataclasses.replace(layer.submodules_config, input_layernorm=IdentityOp,
                                        pre_mlp_layernorm=layer.submodules_config.pre_mlp_layernorm if moe
                                        else IdentityOp, sharded_state_dict_keys_map={})
        layer.submodules_config = with_local_checkpoint_keys(ModuleSpec(TransformerLayer, submodules=te_shaped)).submodules
    return model
