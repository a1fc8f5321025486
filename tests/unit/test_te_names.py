"""Transformer Engine's parameter names: one translation, read from Megatron-Core's own checkpoint key map, lets a
TE-spec model (what the ``auto`` spec builds on a GPU) sync its weights to a rollout engine, be exported to HF and
train with the right optimizer groups. TE cannot be imported here: the models carry TE's names through
``megatron_save.testing.te_names``, which re-homes the norms as TE's fused layers hold them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import hf_tensors
from megatron.core.transformer.identity_op import IdentityOp
from safetensors.torch import load_file

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.hf.gather import gather_hf_state
from megatron_save.models.families import family_for
from megatron_save.models.spec import (
    layer_spec,
    local_checkpoint_keys,
    local_parameter_name,
    with_local_checkpoint_keys,
)
from megatron_save.testing.te_names import TE_FUSED_NORM, with_te_parameter_names

DENSE = ("llama-lm", "qwen2-lm", "qwen3-lm", "llama-rmv")


def _te_model(checkpoint):
    model, meta, hf_config = build_model_from_checkpoint(checkpoint)
    return with_te_parameter_names(model), meta, hf_config


def test_translation_is_megatron_cores_checkpoint_key_map():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    assert local_checkpoint_keys() == get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    assert local_parameter_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert local_parameter_name("module.decoder.layers.12.mlp.linear_fc1.layer_norm_weight") == \
        "module.decoder.layers.12.pre_mlp_layernorm.weight"
    for name in ("decoder.layers.3.input_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                 "decoder.layers.0.self_attention.q_layernorm.weight", "decoder.final_layernorm.weight",
                 "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", "decoder.layers.1.mlp.router.weight",
                 "output_layer.value_head.weight", "embedding.word_embeddings.weight"):
        assert local_parameter_name(name) == name


def test_local_checkpoints_already_use_te_keys(world_of_one):
    """The keys a local-spec model saves are the TE names the translation takes back to the local ones."""
    from megatron_save.models.builder import build_model
    from megatron_save.testing import tiny_hf_config

    model = build_model(tiny_hf_config("qwen3"), "causal_lm", spec_backend="local")
    sharded = model.sharded_state_dict()
    renamed = {name: sharded[name].key for name, _ in model.named_parameters() if name.startswith("decoder.layers.0.")}
    assert renamed["decoder.layers.0.input_layernorm.weight"] == \
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    for name, key in renamed.items():
        assert local_parameter_name(key.replace("decoder.layers.", "decoder.layers.0.")) == name


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_local_names_are_their_own_translation_and_what_the_mappings_name(family, world_of_one):
    from megatron_save.checkpoint.hf import param_mappings
    from megatron_save.models.builder import build_model
    from megatron_save.testing import tiny_hf_config

    config = tiny_hf_config(family, reward_model=True)
    model = build_model(config, "reward_model", spec_backend="local", value_head=True)
    names = [name for name, _ in model.named_parameters()]
    assert [local_parameter_name(name) for name in names] == names
    assert sorted(m.megatron for m in param_mappings(family_for(config), config, True, True)) == sorted(names)


def test_te_moe_layer_saves_its_pre_mlp_norm_under_the_local_key():
    """TE's MoE layer keeps the pre-MLP norm as a module; the local spec saves it as mlp.linear_fc1.layer_norm_weight:
    layer_spec("te") must save it so too, or local-spec MoE checkpoints do not load into TE models."""
    local = layer_spec("local", qk_layernorm=True, num_experts=4)
    te_moe = dataclasses.replace(local, submodules=dataclasses.replace(
        local.submodules, input_layernorm=IdentityOp, sharded_state_dict_keys_map={"mlp.0.weight": "x"}))
    keys = with_local_checkpoint_keys(te_moe).submodules.sharded_state_dict_keys_map
    assert keys == {"mlp.0.weight": "x", "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    te_dense = dataclasses.replace(te_moe, submodules=dataclasses.replace(
        te_moe.submodules, pre_mlp_layernorm=IdentityOp, sharded_state_dict_keys_map={}))
    assert with_local_checkpoint_keys(te_dense).submodules.sharded_state_dict_keys_map == {}


@pytest.mark.parametrize("name", DENSE)
def test_te_named_model_syncs_exact_hf_tensors(name, tiny_models, world_of_one):
    model, _, hf_config = _te_model(tiny_models[name]["mg"])
    names = [n for n, _ in model.named_parameters()]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    original = hf_tensors(tiny_models[name]["hf"])
    if hf_config.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    gathered = dict(gather_hf_state(model, family_for(hf_config), hf_config))
    assert sorted(gathered) == sorted(original)
    assert all(torch.equal(gathered[k], original[k]) for k in original)


def test_te_named_moe_model_syncs_exact_hf_tensors(tiny_moe_models, world_of_one):
    model, _, hf_config = _te_model(tiny_moe_models["qwen3_moe-rmv"]["mg"])
    names = [n for n, _ in model.named_parameters()]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in names  # TE keeps it before the router
    gathered = dict(gather_hf_state(model, family_for(hf_config), hf_config))
    original = hf_tensors(tiny_moe_models["qwen3_moe-rmv"]["hf"])
    assert sorted(gathered) == sorted(original)
    assert all(torch.equal(gathered[k], original[k]) for k in original)


@pytest.mark.parametrize("name", ["qwen3-lm", "llama-rmv", "qwen3_moe-rmv"])
def test_checkpoint_of_a_te_named_model_exports_to_the_same_hf_tensors(name, tiny_models, tiny_moe_models,
                                                                       world_of_one, tmp_path):
    """A checkpoint written by a TE-spec model (stage 3 on a GPU) exports through the local spec, and a TE-named
    model's own (name, tensor) pairs convert as well."""
    from megatron_save.checkpoint.convert import _hf_tensors, convert_megatron_to_hf
    from megatron_save.checkpoint.hf import param_mappings
    from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR, save_model_checkpoint

    dirs = {**tiny_models, **tiny_moe_models}[name]
    model, meta, hf_config = _te_model(dirs["mg"])
    with torch.no_grad():  # a trained model: the norms differ from the checkpoint's
        model.decoder.layers[1].self_attention.linear_qkv.get_parameter(TE_FUSED_NORM).mul_(1.5)
    save_model_checkpoint(model, tmp_path / "te_ckpt", meta, dirs["mg"] / HF_SUBDIR)
    exported = load_file(convert_megatron_to_hf(tmp_path / "te_ckpt", tmp_path / "hf") / "model.safetensors")
    expected = hf_tensors(dirs["hf"])
    expected["model.layers.1.input_layernorm.weight"] = expected["model.layers.1.input_layernorm.weight"] * 1.5
    expected.pop("value_head.weight", None)
    if hf_config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert sorted(exported) == sorted(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)

    mappings = {m.megatron: m for m in param_mappings(family_for(hf_config), hf_config, meta.kind == "reward_model",
                                                      meta.value_head)}
    direct = dict(_hf_tensors(((n, p.detach()) for n, p in model.named_parameters()), mappings))
    assert all(torch.equal(direct[k], expected[k]) for k in expected)


def test_te_named_norms_are_grouped_like_the_local_ones(tiny_models, world_of_one):
    """Optimizer groups: every norm weight (TE's layer_norm_weight included) without weight decay, the value head
    alone in its own group."""
    from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state

    model, _, _ = _te_model(tiny_models["llama-rmv"]["mg"])
    names = {id(p): n for n, p in model.named_parameters()}
    settings = OptimizerSettings(lr=1e-3, value_head_lr=3e-2, weight_decay=0.1)
    state = build_train_state(model, settings, 4)
    groups = {}
    for group in state.optimizer.param_groups:
        for param in group["params"]:
            groups[names[id(param)]] = group
    assert any(TE_FUSED_NORM in n for n in groups)
    for name, group in groups.items():
        norm = name.endswith(TE_FUSED_NORM) or name.endswith("layernorm.weight")
        assert (group["wd_mult"] == 0.0) == norm, name
        assert (group["max_lr"] == settings.value_head_lr) == ("value_head" in name), name
