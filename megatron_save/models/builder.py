"""Builds the Megatron-Core model for this rank's pipeline stage from a Hugging Face config."""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_save.config.recompute import RecomputeSettings
from megatron_save.distributed.init import ParallelLayoutError
from megatron_save.models.families import family_for
from megatron_save.models.gpt_config import gpt_args_from_hf
from megatron_save.models.reward_model import RewardGPTModel
from megatron_save.models.spec import SpecBackend, layer_spec, resolve_backend


class ModelKind(str, Enum):
    """What sits on the last pipeline stage."""

    CAUSAL_LM = "causal_lm"
    REWARD_MODEL = "reward_model"


def build_model(
    hf_config: Any,
    kind: ModelKind | str,
    dtype: str = "fp32",
    spec_backend: SpecBackend | str = SpecBackend.AUTO,
    value_head: bool = False,
    on_meta_device: bool = False,
    recompute: RecomputeSettings | None = None,
    recompute_name: str = "recompute",
) -> GPTModel:
    """This rank's stage of the model under the current Megatron parallel state (randomly initialised), or with
    ``on_meta_device`` its shapes alone (parameters on the meta device, for a caller that fills them part by
    part with ``module.to_empty``).

    ``recompute``: activation recompute, for a model that trains (its training forwards; forwards in eval mode,
    as scoring and generation run, keep nothing for a backward and recompute nothing); ``recompute_name`` names
    the setting in a refusal.
    """
    kind = ModelKind(kind)
    family = family_for(hf_config)
    args = gpt_args_from_hf(hf_config, dtype, on_meta_device, recompute, recompute_name)
    if args.config.sequence_parallel and resolve_backend(spec_backend) is SpecBackend.LOCAL:
        # torch's norms do not mark their weights for the tensor-parallel gradient reduction that sequence
        # parallelism needs, and Megatron's wrapper asserts instead (transformer/torch_norm.py:32).
        raise ParallelLayoutError(
            "sequence_parallel=true needs the Transformer Engine layer spec (a GPU with transformer-engine): "
            "megatron-core 0.16's local spec builds torch norms, which refuse sequence parallelism")
    common = dict(
        config=args.config,
        transformer_layer_spec=layer_spec(spec_backend, qk_layernorm=family.qk_norm,
                                          num_experts=args.config.num_moe_experts),
        vocab_size=args.vocab_size,
        max_sequence_length=args.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        rotary_base=args.rotary_base,
        rope_scaling=args.rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
    )
    if value_head and kind is not ModelKind.REWARD_MODEL:
        raise ValueError("value_head=True is only meaningful for a reward model")
    with torch.device("meta") if on_meta_device else contextlib.nullcontext():
        if kind is ModelKind.REWARD_MODEL:
            # The reward is read where transformers' *ForSequenceClassification reads it: by the config's pad token.
            model = RewardGPTModel(**common, value_head=value_head,
                                   pad_token_id=getattr(hf_config, "pad_token_id", None))
        else:
            model = GPTModel(**common, share_embeddings_and_output_weights=args.tie_embeddings, parallel_output=True)
    if torch.cuda.is_available() and not on_meta_device:
        # Megatron builds on the CPU when asked to (use_cpu_initialization) and never moves the model itself.
        model.cuda(torch.cuda.current_device())
    if args.config.params_dtype != torch.float32:
        # The local spec builds its norms in fp32 whatever params_dtype says.
        model.to(args.config.params_dtype)
    return model
