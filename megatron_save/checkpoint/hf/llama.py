"""Llama 3.x (and Llama-architecture reward models such as Skywork-Reward-V2-Llama-3.2)."""

from megatron_save.checkpoint.hf.common import DecoderFamily

LLAMA = DecoderFamily(
    name="llama",
    model_types=("llama",),
    causal_lm_architecture="LlamaForCausalLM",
    reward_model_architecture="LlamaForSequenceClassification",
    qkv_bias=False,
    qk_norm=False,
)
