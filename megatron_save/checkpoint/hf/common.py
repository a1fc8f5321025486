"""The HF <-> Megatron weight mapping every Llama-like decoder family shares, driven by the family's facts
(``megatron_save.models.families``: q/k/v biases, q/k norms, head width).

A mapping works on full (TP=1, PP=1) tensors and Megatron-Core local-spec parameter names; a Transformer Engine
model's names reach it through ``megatron_save.models.spec.local_parameter_name``. The conversion tools use it
through a world-of-one model, and dist_checkpointing reshards the result to any TP / PP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from megatron_save.models.families import DecoderFamily, head_dim_of


# The value head of a value-anchored reward model has no place in transformers' *ForSequenceClassification; it
# travels beside the HF weights as this file holding one tensor "value_head.weight" of shape [1, hidden] (in the
# checkpoint's dtype).
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_TENSOR = "value_head.weight"


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter and the Hugging Face tensors it is made of."""

    megatron: str
    """Parameter name in the Megatron model's state dict at TP=1, PP=1 (local spec; ``local_parameter_name``
    gives a TE model's name in it)."""
    hf: tuple[str, ...]
    """Hugging Face tensor names, in the order ``merge`` takes them."""
    merge: Callable[[list[torch.Tensor]], torch.Tensor]
    """HF tensors -> Megatron tensor."""
    split: Callable[[torch.Tensor], list[torch.Tensor]]
    """Megatron tensor -> HF tensors (inverse of ``merge``)."""


def _identity(name_megatron: str, name_hf: str) -> ParamMapping:
    return ParamMapping(name_megatron, (name_hf,), merge=lambda ts: ts[0], split=lambda t: [t])


def _qkv(name_megatron: str, hf_names: tuple[str, str, str], heads: int, groups: int, head_dim: int) -> ParamMapping:
    """Megatron fuses q, k, v group by group: [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]."""
    heads_per_group = heads // groups

    def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = tensors  # [heads*d, ...], [groups*d, ...], [groups*d, ...]
        rest = q.shape[1:]
        q = q.reshape(groups, heads_per_group * head_dim, *rest)
        k = k.reshape(groups, head_dim, *rest)
        v = v.reshape(groups, head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * head_dim, *rest)

    def split(fused: torch.Tensor) -> list[torch.Tensor]:
        rest = fused.shape[1:]
        grouped = fused.reshape(groups, (heads_per_group + 2) * head_dim, *rest)
        q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
        return [
            q.reshape(heads * head_dim, *rest).contiguous(),
            k.reshape(groups * head_dim, *rest).contiguous(),
            v.reshape(groups * head_dim, *rest).contiguous(),
        ]

    return ParamMapping(name_megatron, hf_names, merge=merge, split=split)


def _gate_up(name_megatron: str, hf_names: tuple[str, str]) -> ParamMapping:
    """Megatron's SwiGLU fc1 is [gate; up] stacked on the output dimension."""
    return ParamMapping(
        name_megatron,
        hf_names,
        merge=lambda ts: torch.cat(ts, dim=0),
        split=lambda t: [c.contiguous() for c in torch.chunk(t, 2, dim=0)],
    )


def _moe_mappings(mg: str, hf: str, num_experts: int) -> list[ParamMapping]:
    """The router and every expert of one MoE layer; HF checkpoints store experts one by one
    (``mlp.experts.<e>.gate_proj`` ...), Megatron's SequentialMLP as ``mlp.experts.local_experts.<e>``."""
    mappings = [_identity(f"{mg}mlp.router.weight", f"{hf}mlp.gate.weight")]
    for expert in range(num_experts):
        mg_expert, hf_expert = f"{mg}mlp.experts.local_experts.{expert}.", f"{hf}mlp.experts.{expert}."
        gate_up = (f"{hf_expert}gate_proj.weight", f"{hf_expert}up_proj.weight")
        mappings.append(_gate_up(f"{mg_expert}linear_fc1.weight", gate_up))
        mappings.append(_identity(f"{mg_expert}linear_fc2.weight", f"{hf_expert}down_proj.weight"))
    return mappings


def param_mappings(
    family: DecoderFamily, hf_config: Any, reward_model: bool, value_head: bool = False
) -> list[ParamMapping]:
    """Every Megatron parameter of the model with the HF tensors it maps to, in model order.

    The value head maps to ``VALUE_HEAD_TENSOR`` of the side file ``VALUE_HEAD_FILE``.
    """
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = head_dim_of(hf_config)
    mappings = [_identity("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(hf_config.num_hidden_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = f"{hf}self_attn."
        mappings.append(_identity(f"{mg}input_layernorm.weight", f"{hf}input_layernorm.weight"))
        qkv_names = (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight")
        mappings.append(_qkv(f"{mg}self_attention.linear_qkv.weight", qkv_names, heads, groups, head_dim))
        if family.qkv_bias:
            bias_names = (f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias")
            mappings.append(_qkv(f"{mg}self_attention.linear_qkv.bias", bias_names, heads, groups, head_dim))
        if family.qk_norm:
            mappings.append(_identity(f"{mg}self_attention.q_layernorm.weight", f"{attn}q_norm.weight"))
            mappings.append(_identity(f"{mg}self_attention.k_layernorm.weight", f"{attn}k_norm.weight"))
        mappings.append(_identity(f"{mg}self_attention.linear_proj.weight", f"{attn}o_proj.weight"))
        mappings.append(_identity(f"{mg}pre_mlp_layernorm.weight", f"{hf}post_attention_layernorm.weight"))
        if family.moe:
            mappings.extend(_moe_mappings(mg, hf, hf_config.num_experts))
            continue
        gate_up = (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight")
        mappings.append(_gate_up(f"{mg}mlp.linear_fc1.weight", gate_up))
        mappings.append(_identity(f"{mg}mlp.linear_fc2.weight", f"{hf}mlp.down_proj.weight"))
    mappings.append(_identity("decoder.final_layernorm.weight", "model.norm.weight"))
    if reward_model:
        mappings.append(_identity("output_layer.reward_head.weight", "score.weight"))
        if value_head:
            mappings.append(_identity("output_layer.value_head.weight", VALUE_HEAD_TENSOR))
    elif not hf_config.tie_word_embeddings:
        mappings.append(_identity("output_layer.weight", "lm_head.weight"))
    return mappings
