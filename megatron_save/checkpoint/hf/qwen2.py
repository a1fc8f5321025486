"""Qwen2 / Qwen2.5: biases on q, k, v; small models tie embeddings."""

from megatron_save.checkpoint.hf.common import DecoderFamily

QWEN2 = DecoderFamily(
    name="qwen2",
    model_types=("qwen2",),
    causal_lm_architecture="Qwen2ForCausalLM",
    reward_model_architecture="Qwen2ForSequenceClassification",
    qkv_bias=True,
    qk_norm=False,
)
