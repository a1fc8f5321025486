"""RoPE where its settings matter: the Megatron model's rotary inverse frequencies and tables equal transformers'
for every family and rope type, and logits agree over a sequence longer than Llama-3 scaling's low-frequency
wavelength (original_max_position_embeddings / low_freq_factor = 8192 tokens, fixed by Megatron-Core), where a
wrong scaling factor moves the logits far beyond the tolerance."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.checkpoint.parity import (
    ROPE_RTOL,
    ParityBatch,
    load_transformers_model,
    megatron_inverse_frequencies,
    parity_failures,
    parity_report,
    relative_difference,
    rope_relative_difference,
)
from megatron_save.models.builder import build_model
from megatron_save.models.spec import SpecBackend
from megatron_save.testing import save_tiny_hf_model
from megatron_save.testing.tiny_models import tiny_hf_config

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ROPES = {"default": {"rope_type": "default", "rope_theta": 500000.0}, "llama3": LLAMA3}
TABLE_POSITIONS = 16384  # twice the low-frequency wavelength: every scaled frequency turns more than once
TABLE_ATOL = 1e-6
"""cos / sin tables: both sides round the same fp32 product position x inv_freq and take cos / sin of it
(measured difference: 0 for every family and rope type). 1e-6 leaves a few ulp of libm's cos / sin; a wrong
factor moves the tables by O(1) at these positions."""
LONG_SEQUENCE = 8192 + 128  # past the low-frequency wavelength: relative distances up to 8319 tokens
LONG_RTOL = 4e-6
"""Logits parity over LONG_SEQUENCE tokens, relative to the largest logit. Measured at the correct factor on an
AMD EPYC (2 threads): 4.1e-7 (fp32 summation order over up to 8320 keys in two layers); 4e-6 leaves 10x for
other CPUs' kernels and thread counts. The same weights with factor 8 in place of 32 move the logits by 1.3e-2
(asserted below to exceed 10x this tolerance)."""
SHARPEN_QK = 4.0
"""q and k projections scaled up: a tiny model at its 0.02 initialisation attends almost uniformly, so the
rotation angles barely matter; sharper attention makes the logits depend on them as a trained model's do."""


def _config(family: str, rope: str, factor: float = 32.0) -> transformers.PretrainedConfig:
    return tiny_hf_config(family, rope_parameters={**ROPES[rope], **({"factor": factor} if rope == "llama3" else {})},
                          max_position_embeddings=TABLE_POSITIONS)


def _megatron_and_transformers_rotary(config, megatron_config=None):
    """(Megatron's GPTModel, transformers' rotary embedding module) of the same config (or of two)."""
    model = build_model(megatron_config or config, "causal_lm", "fp32", SpecBackend.LOCAL)
    rotary = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).base_model.rotary_emb
    return model, rotary


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_inverse_frequencies_and_rotary_tables_match_transformers(family, rope, world_of_one):
    config = _config(family, rope)
    model, rotary = _megatron_and_transformers_rotary(config)
    ours = megatron_inverse_frequencies(model)
    assert rotary.attention_scaling == 1.0  # Megatron scales no attention: only rope types that need none
    assert rope_relative_difference(ours, rotary.inv_freq.float()) <= ROPE_RTOL

    # The tables the attention rotates by, at positions up to twice the low-frequency wavelength.
    angles = model.rotary_pos_emb(TABLE_POSITIONS)[:, 0, 0].float().cpu()  # [P, d]
    positions = torch.arange(TABLE_POSITIONS)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # [1, P, d]
    assert (angles.cos() - cos[0]).abs().max().item() <= TABLE_ATOL
    assert (angles.sin() - sin[0]).abs().max().item() <= TABLE_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrong_llama3_factor_is_seen(family, world_of_one):
    """The checks above can fail: Megatron built with factor 8 where transformers has 32."""
    model, rotary = _megatron_and_transformers_rotary(_config(family, "llama3", 32.0), _config(family, "llama3", 8.0))
    difference = rope_relative_difference(megatron_inverse_frequencies(model), rotary.inv_freq.float())
    assert difference > 1.0, difference  # the lowest frequencies differ by a factor of 4
    angles = model.rotary_pos_emb(TABLE_POSITIONS)[:, 0, 0].float().cpu()
    cos, _ = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(TABLE_POSITIONS)[None])
    assert (angles.cos() - cos[0]).abs().max().item() > 0.1


def _sharpened_llama(out_dir, factor: float = 32.0):
    """A 2-layer tiny Llama (Llama-3 RoPE, factor 32) with SHARPEN_QK applied to its q / k projections; with
    ``factor`` another value in the config only (the same weights)."""
    hf_dir = save_tiny_hf_model("llama", out_dir, seed=3, num_hidden_layers=2)
    tensors = load_file(hf_dir / "model.safetensors")
    for name in tensors:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[name] = tensors[name] * SHARPEN_QK
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    if factor != 32.0:
        config = json.loads((hf_dir / "config.json").read_text())
        config["rope_parameters"]["factor"] = factor
        (hf_dir / "config.json").write_text(json.dumps(config))
    return hf_dir


def test_logits_match_beyond_the_low_frequency_wavelength(tmp_path, world_of_one):
    hf_dir = _sharpened_llama(tmp_path / "hf")
    convert_hf_to_megatron(hf_dir, tmp_path / "mg")
    input_ids = torch.randint(4, 100, (1, LONG_SEQUENCE), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    batch = ParityBatch(input_ids=input_ids, mask=mask, prompt_lengths=torch.tensor([LONG_SEQUENCE // 2]))
    report = parity_report(tmp_path / "mg", hf_dir, batch)
    assert report.max_rel_diff <= LONG_RTOL, report
    assert parity_failures(report, LONG_RTOL, 0.98) == [], report

    # The input sees the factor: transformers with factor 8 on the same weights is far outside the tolerance.
    wrong_dir = shutil.copytree(hf_dir, tmp_path / "hf-factor-8")
    config = json.loads((wrong_dir / "config.json").read_text())
    config["rope_parameters"]["factor"] = 8.0
    (wrong_dir / "config.json").write_text(json.dumps(config))
    wrong = load_transformers_model(wrong_dir, reward_model=False)
    with torch.no_grad():
        right_logits = load_transformers_model(hf_dir, reward_model=False)(input_ids).logits
        wrong_logits = wrong(input_ids).logits
    assert relative_difference(wrong_logits, right_logits, mask) > 10 * LONG_RTOL
