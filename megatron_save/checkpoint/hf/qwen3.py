"""Qwen3 (dense): RMSNorm on each query / key head, explicit ``head_dim``."""

from megatron_save.checkpoint.hf.common import DecoderFamily

QWEN3 = DecoderFamily(
    name="qwen3",
    model_types=("qwen3",),
    causal_lm_architecture="Qwen3ForCausalLM",
    reward_model_architecture="Qwen3ForSequenceClassification",
    qkv_bias=False,
    qk_norm=True,
)
