"""Random tiny Llama / Qwen2 / Qwen3 models and a character tokenizer, built from configs in-process.

Each family's tiny config exercises what makes the family different: Llama has GQA and untied embeddings,
Qwen2 has q/k/v biases and tied embeddings, Qwen3 has q/k norm and a head_dim that is not hidden / heads.
Qwen3-MoE (``TINY_MOE_FAMILIES``, kept out of ``TINY_FAMILIES`` so the dense test matrix does not grow) routes
each token to 2 of 4 experts in every layer. Vocabulary (128), heads (4), query groups (2), layers (4) and
experts (4) divide by TP=2, PP=2 and EP=2.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, processors
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast

from megatron_save.checkpoint.hf.common import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR

TINY_FAMILIES = ("llama", "qwen2", "qwen3")
TINY_MOE_FAMILIES = ("qwen3_moe",)
TINY_VOCAB = 128
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Rendered as reward-bench renders conversations: one turn per role, no generation prompt for scoring.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_FAMILY_SETTINGS = {
    "llama": dict(
        config_class="LlamaConfig",
        architecture="Llama",
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=16384,
    ),
    "qwen2": dict(config_class="Qwen2Config", architecture="Qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(config_class="Qwen3Config", architecture="Qwen3", num_key_value_heads=2, head_dim=24,
                  tie_word_embeddings=False),
    "qwen3_moe": dict(config_class="Qwen3MoeConfig", architecture="Qwen3Moe", num_key_value_heads=2, head_dim=24,
                      tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, router_aux_loss_coef=0.01),
}

# Shapes besides the tiny default, named for the GPU acceptance script: "0.5b" is Qwen2.5-0.5B's (with the
# character tokenizer, whose ids use the first 100 of the 151936 embedding rows).
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048),
}


def tiny_hf_config(family: str, reward_model: bool = False, **overrides: Any) -> transformers.PretrainedConfig:
    """A tiny transformers config of ``family``; ``reward_model`` makes it a single-label classifier."""
    if family not in _FAMILY_SETTINGS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES + TINY_MOE_FAMILIES}")
    settings = {**_COMMON, **_FAMILY_SETTINGS[family], **overrides}
    config_class = getattr(transformers, settings.pop("config_class"))
    suffix = "ForSequenceClassification" if reward_model else "ForCausalLM"
    architecture = settings.pop("architecture") + suffix
    config = config_class(**settings, architectures=[architecture])
    if reward_model:
        config.num_labels = 1
    return config


def tiny_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with a chat template, built without any download.

    ``adds_bos``: the tokenizer itself prepends BOS (as Llama 3's does), on top of the template's.
    """
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK])}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.decoder = decoders.Fuse()  # characters join back without separators: decode inverts encode
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_hf_model(
    family: str,
    out_dir: str | Path,
    reward_model: bool = False,
    seed: int = 0,
    value_head: bool = False,
    reward_head_std: float = 0.5,
    **overrides: Any,
) -> Path:
    """Writes a randomly initialised tiny model (safetensors), its config and the tokenizer to ``out_dir``.

    ``value_head`` (reward models only) adds a value head (the reward head plus noise) in the ``VALUE_HEAD_FILE``
    side file. ``reward_head_std``: standard deviation of the reward head's initial weights (the default gives
    rewards that differ visibly between responses; transformers' own initialisation uses 0.02).
    """
    config = tiny_hf_config(family, reward_model, **overrides)
    torch.manual_seed(seed)
    auto_class = transformers.AutoModelForSequenceClassification if reward_model else transformers.AutoModelForCausalLM
    model = auto_class.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Norm weights start at exactly 1 and biases at 0: perturb them so the mapping of every tensor matters.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
            if name == "score.weight":
                param.normal_(0.0, reward_head_std)
            if name.endswith("mlp.gate.weight"):
                # A MoE router at its 0.02 initialisation weighs the chosen experts almost equally.
                param.normal_(0.0, 0.3)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    if value_head:
        if not reward_model:
            raise ValueError("a value head belongs to a reward model")
        # Near the reward head, so V(x) starts on the reward's scale (as stage 2 leaves it), yet distinct from it.
        weight = model.score.weight.detach().clone() + 0.3 * torch.randn(1, config.hidden_size)
        save_file({VALUE_HEAD_TENSOR: weight}, out_dir / VALUE_HEAD_FILE, metadata={"format": "pt"})
    return out_dir
