"""Hugging Face decoder config -> Megatron-Core TransformerConfig and GPTModel arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from megatron_save.config.recompute import RecomputeSettings, check_recompute
from megatron_save.distributed.init import ModelShape, sequence_parallel
from megatron_save.models.families import UnsupportedModelError, family_for, head_dim_of, moe_settings, rope_parameters

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class GPTArgs:
    """Everything GPTModel needs besides the layer spec."""

    config: TransformerConfig
    """Megatron transformer config, with the current TP / PP sizes."""
    vocab_size: int
    """Embedding rows (the HF ``vocab_size``)."""
    max_sequence_length: int
    """``max_position_embeddings`` of the HF config."""
    rotary_base: float
    """RoPE theta."""
    rope_scaling: bool
    """Llama-3 RoPE frequency scaling on."""
    rope_scaling_factor: float
    """Llama-3 RoPE scaling factor (8 for Llama 3.1, 32 for Llama 3.2)."""
    tie_embeddings: bool
    """Output projection shares the embedding weight."""


def gpt_args_from_hf(hf_config: Any, dtype: str = "fp32", on_meta_device: bool = False,
                     recompute: RecomputeSettings | None = None, recompute_name: str = "recompute") -> GPTArgs:
    """Translates a Llama / Qwen2 / Qwen3 transformers config; refuses settings that would not be exact.

    ``on_meta_device``: the model is built without memory (shapes only) on the host side, weights uninitialised.
    ``recompute``: the activation recompute of a model that trains (None: none), ``recompute_name`` its setting's
    name in a refusal.
    """
    family = family_for(hf_config)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    params_dtype = DTYPES[dtype]
    on_gpu = torch.cuda.is_available() and not on_meta_device
    tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
    pipeline_parallel = parallel_state.get_pipeline_model_parallel_world_size()
    config = TransformerConfig(
        **(_moe_arguments(hf_config, on_gpu) if family.moe else {}),
        **recompute_arguments(recompute or RecomputeSettings(), hf_config.num_hidden_layers // pipeline_parallel,
                              recompute_name),
        sequence_parallel=sequence_parallel(),
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim_of(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Fused kernels need CUDA; on CPU the plain PyTorch paths run.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        perform_initialization=not on_meta_device,
    )
    rope = rope_parameters(hf_config)
    return GPTArgs(
        config=config,
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        rotary_base=rope.get("rope_theta", 10000.0),
        rope_scaling=rope.get("rope_type", "default") == "llama3",
        rope_scaling_factor=float(rope.get("factor", 8.0)),
        tie_embeddings=bool(hf_config.tie_word_embeddings),
    )


def recompute_arguments(settings: RecomputeSettings, layers_per_stage: int, name: str = "recompute") -> dict:
    """TransformerConfig arguments of ``settings`` for a model with ``layers_per_stage`` transformer layers on each
    pipeline stage (refused, naming the setting ``name``, when they cannot apply)."""
    check_recompute(settings, name, layers_per_stage)
    if settings.granularity is None:
        return {}
    if settings.granularity == "full":
        return dict(recompute_granularity="full", recompute_method=settings.method,
                    recompute_num_layers=settings.num_layers)
    arguments = dict(recompute_granularity="selective")
    if "recompute_modules" in {field.name for field in dataclasses.fields(TransformerConfig)}:
        # Selective recompute of core attention alone (a release without the field recomputes only that).
        arguments["recompute_modules"] = ["core_attn"]
    return arguments


def _moe_arguments(hf_config: Any, on_gpu: bool) -> dict:
    """TransformerConfig arguments of routed experts: the family's routing, Megatron's load-balancing loss, and
    the expert-parallel layout of the current parallel state."""
    from megatron_save.models.spec import transformer_engine_available

    moe = moe_settings(hf_config)
    if on_gpu and not transformer_engine_available():
        # megatron-core 0.16.1's router reads te_general_gemm, a name only its Transformer Engine import defines.
        raise UnsupportedModelError(f"{hf_config.model_type}: MoE models on a GPU need Transformer Engine with "
                                    "megatron-core 0.16 (its MoE router fails without it)")
    if moe.top_k == 1 and moe.normalize_top_k:
        raise UnsupportedModelError(f"{hf_config.model_type}: num_experts_per_tok=1 with norm_topk_prob=True "
                                    "(Megatron-Core routes one expert only with the softmax before the top-k)")
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        # Softmax over the top-k logits equals the top-k softmax probabilities renormalised to sum to one.
        moe_router_pre_softmax=not moe.normalize_top_k,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
    )


def model_shape(hf_config: Any, source: str = "") -> ModelShape:
    """The dimensions a parallel layout must divide, for the start-up check; ``source`` names the model in a
    refusal."""
    return ModelShape(
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        vocab_size=hf_config.vocab_size,
        num_experts=getattr(hf_config, "num_experts", 0) if family_for(hf_config).moe else 0,
        source=str(source),
    )
