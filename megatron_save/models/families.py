"""The Hugging Face decoder families this package builds, and what the Megatron model must know about each.

One place for every architecture fact: which ``model_type`` and transformers classes belong to a family, its
q/k/v biases and q/k norms, the per-head width, the RoPE settings, and the settings Megatron-Core cannot
reproduce exactly (refused with UnsupportedModelError). The HF <-> Megatron weight mappings built on these facts
live in ``megatron_save.checkpoint.hf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    """A Hugging Face model this package cannot represent exactly; the message names the setting."""


@dataclass(frozen=True)
class DecoderFamily:
    """A Hugging Face decoder family that maps onto Megatron-Core's GPTModel."""

    name: str
    """Short name, used in checkpoint metadata (``llama``, ``qwen2``, ``qwen3``)."""
    model_types: tuple[str, ...]
    """Values of ``config.model_type`` that belong to the family."""
    causal_lm_architecture: str
    """transformers class of the causal LM, e.g. ``LlamaForCausalLM``."""
    reward_model_architecture: str
    """transformers class of the single-label reward model, e.g. ``LlamaForSequenceClassification``."""
    qkv_bias: bool
    """Biases on the q, k and v projections only (Qwen2)."""
    qk_norm: bool
    """RMSNorm on each query and key head before RoPE (Qwen3)."""
    moe: bool = False
    """Every layer's MLP is a top-k routed mixture of SwiGLU experts (Qwen3-MoE), see ``moe_settings``."""


LLAMA = DecoderFamily(
    name="llama",
    model_types=("llama",),
    causal_lm_architecture="LlamaForCausalLM",
    reward_model_architecture="LlamaForSequenceClassification",
    qkv_bias=False,
    qk_norm=False,
)
"""Llama 3.x (and Llama-architecture reward models such as Skywork-Reward-V2-Llama-3.2)."""

QWEN2 = DecoderFamily(
    name="qwen2",
    model_types=("qwen2",),
    causal_lm_architecture="Qwen2ForCausalLM",
    reward_model_architecture="Qwen2ForSequenceClassification",
    qkv_bias=True,
    qk_norm=False,
)
"""Qwen2 / Qwen2.5: biases on q, k, v; small models tie embeddings."""

QWEN3 = DecoderFamily(
    name="qwen3",
    model_types=("qwen3",),
    causal_lm_architecture="Qwen3ForCausalLM",
    reward_model_architecture="Qwen3ForSequenceClassification",
    qkv_bias=False,
    qk_norm=True,
)
"""Qwen3 (dense): RMSNorm on each query / key head, explicit ``head_dim``."""

QWEN3_MOE = DecoderFamily(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    causal_lm_architecture="Qwen3MoeForCausalLM",
    reward_model_architecture="Qwen3MoeForSequenceClassification",
    qkv_bias=False,
    qk_norm=True,
    moe=True,
)
"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention, routed experts in every layer, no shared expert."""

FAMILIES: dict[str, DecoderFamily] = {family.name: family for family in (LLAMA, QWEN2, QWEN3, QWEN3_MOE)}
"""Every supported family by its short name."""


@dataclass(frozen=True)
class MoESettings:
    """The routed-experts facts of a MoE config, in the words of Megatron-Core's TransformerConfig."""

    num_experts: int
    """Routed experts per layer."""
    top_k: int
    """Experts each token is sent to."""
    expert_ffn_hidden_size: int
    """Intermediate width of one expert's SwiGLU."""
    normalize_top_k: bool
    """Routing weights renormalised over the chosen k (softmax over the top-k logits); else the top-k entries of
    the softmax over all experts."""
    aux_loss_coeff: float
    """Weight of the load-balancing auxiliary loss."""


def moe_settings(hf_config: Any) -> MoESettings:
    """The routing settings of a Qwen3-MoE config (``num_experts``, ``num_experts_per_tok``, ...)."""
    return MoESettings(
        num_experts=hf_config.num_experts,
        top_k=hf_config.num_experts_per_tok,
        expert_ffn_hidden_size=hf_config.moe_intermediate_size,
        normalize_top_k=bool(hf_config.norm_topk_prob),
        aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
    )


def head_dim_of(hf_config: Any) -> int:
    """Per-head width: ``config.head_dim`` when set (Qwen3), else hidden / heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def rope_parameters(hf_config: Any) -> dict:
    """RoPE settings as one dict, from transformers 5 (``rope_parameters``) or 4 (``rope_theta`` + ``rope_scaling``)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    return {"rope_type": "default", **(getattr(hf_config, "rope_scaling", None) or {}),
            "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}


# Megatron-Core 0.16 implements Llama-3 RoPE scaling with these constants fixed; only ``factor`` is free.
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def check_supported(family: DecoderFamily, hf_config: Any) -> None:
    """Raises UnsupportedModelError naming the first setting the Megatron model cannot reproduce exactly."""

    def refuse(setting: str) -> None:
        raise UnsupportedModelError(f"{family.name} model ({hf_config.model_type}): unsupported setting {setting}")

    if getattr(hf_config, "hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf_config.hidden_act!r} (only SwiGLU with silu)")
    if getattr(hf_config, "mlp_bias", False):
        refuse("mlp_bias=True")
    if not family.qkv_bias and getattr(hf_config, "attention_bias", False):
        refuse("attention_bias=True (biases on q/k/v/o projections)")
    if getattr(hf_config, "use_sliding_window", False):
        refuse("use_sliding_window=True")
    if hf_config.num_attention_heads % hf_config.num_key_value_heads != 0:
        refuse(f"num_attention_heads={hf_config.num_attention_heads} not a multiple of "
               f"num_key_value_heads={hf_config.num_key_value_heads}")
    if family.moe:
        if getattr(hf_config, "mlp_only_layers", None):
            refuse(f"mlp_only_layers={hf_config.mlp_only_layers} (dense layers among MoE layers)")
        if getattr(hf_config, "decoder_sparse_step", 1) != 1:
            refuse(f"decoder_sparse_step={hf_config.decoder_sparse_step} (dense layers among MoE layers)")
        if hf_config.num_experts_per_tok > hf_config.num_experts:
            refuse(f"num_experts_per_tok={hf_config.num_experts_per_tok} > num_experts={hf_config.num_experts}")
    rope = rope_parameters(hf_config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        for key, value in _MEGATRON_LLAMA3_ROPE.items():
            if float(rope.get(key, value)) != value:
                refuse(f"rope {key}={rope[key]} (Megatron-Core's Llama-3 RoPE scaling fixes it to {value})")
    elif rope_type != "default":
        refuse(f"rope_type={rope_type!r} (supported: default, llama3)")


def family_for(hf_config: Any) -> DecoderFamily:
    """The family of a transformers config; UnsupportedModelError names the model type and what is supported."""
    for family in FAMILIES.values():
        if hf_config.model_type in family.model_types:
            check_supported(family, hf_config)
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise UnsupportedModelError(
        f"unsupported model_type {hf_config.model_type!r} (architectures {getattr(hf_config, 'architectures', None)});"
        f" supported model types: {supported}"
    )


def is_reward_model(family: DecoderFamily, hf_config: Any) -> bool:
    """True for a single-label ``*ForSequenceClassification`` config, False for a causal LM.

    Raises UnsupportedModelError for any other architecture, or a classifier with more than one label.
    """
    architectures = getattr(hf_config, "architectures", None) or [family.causal_lm_architecture]
    architecture = architectures[0]
    if architecture == family.causal_lm_architecture:
        return False
    if architecture == family.reward_model_architecture:
        if hf_config.num_labels != 1:
            raise UnsupportedModelError(
                f"{architecture} with num_labels={hf_config.num_labels}: only single-label (scalar) reward models"
            )
        return True
    raise UnsupportedModelError(
        f"unsupported architecture {architecture!r}; the {family.name} family supports "
        f"{family.causal_lm_architecture} and {family.reward_model_architecture}"
    )
