"""The HF <-> Megatron weight mapping: hand-checked fused layouts and exact inverses."""

from __future__ import annotations

import torch

from megatron_save.checkpoint.hf import param_mappings
from megatron_save.checkpoint.hf.common import _gate_up, _qkv
from megatron_save.models.families import FAMILIES
from megatron_save.testing import tiny_hf_config


def test_qkv_is_fused_group_by_group():
    # 4 query heads, 2 groups, head_dim 1, hidden 1: rows are labelled by their source.
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    mapping = _qkv("qkv", ("q", "k", "v"), heads=4, groups=2, head_dim=1)
    fused = mapping.merge([q, k, v])
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(mapping.split(fused), [q, k, v]))


def test_qkv_bias_and_wider_heads_round_trip():
    mapping = _qkv("qkv", ("q", "k", "v"), heads=8, groups=2, head_dim=3)
    for rest in [(), (5,)]:
        tensors = [torch.randn(8 * 3, *rest), torch.randn(2 * 3, *rest), torch.randn(2 * 3, *rest)]
        fused = mapping.merge(tensors)
        assert fused.shape == (12 * 3, *rest)
        assert all(torch.equal(a, b) for a, b in zip(mapping.split(fused), tensors))


def test_gate_up_stacks_gate_first():
    gate, up = torch.zeros(2, 3), torch.ones(2, 3)
    mapping = _gate_up("fc1", ("gate", "up"))
    fused = mapping.merge([gate, up])
    assert fused[:2].eq(0).all() and fused[2:].eq(1).all()
    assert all(torch.equal(a, b) for a, b in zip(mapping.split(fused), [gate, up]))


def test_family_mappings_cover_the_hf_state_dict(tmp_path):
    """Against the tensors ``save_pretrained`` writes: what conversion reads (transformers 5 holds a MoE layer's
    experts fused in memory and writes them one by one)."""
    import transformers
    from safetensors import safe_open

    for family in FAMILIES.values():
        for reward_model in (False, True):
            config = tiny_hf_config(family.name, reward_model)
            auto = transformers.AutoModelForSequenceClassification if reward_model else transformers.AutoModelForCausalLM
            out = tmp_path / f"{family.name}-{reward_model}"
            auto.from_config(config).save_pretrained(out)
            with safe_open(out / "model.safetensors", "pt") as saved:
                hf_names = set(saved.keys())
            mapped = {name for m in param_mappings(family, config, reward_model) for name in m.hf}
            if config.tie_word_embeddings and not reward_model:
                hf_names.discard("lm_head.weight")
            assert mapped == hf_names, (family.name, reward_model, mapped ^ hf_names)
