"""Transformer Engine's layer spec on a GPU (what the ``auto`` spec builds there): its parameters are the local
spec's under TE's names (one translation, ``megatron_save.models.spec.local_parameter_name``), checkpoints of one spec
load into the other, both match transformers, a bf16 training step agrees between them, and the weight sync reads a
TE-spec model exactly. Every test takes the ``te`` fixture (tests/conftest.py): on a GPU where TE does not import
they are skipped at collection, before the models are converted. The CPU suite checks the same paths with TE's names
emulated (tests/unit/test_te_names.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import token_batch
from safetensors.torch import load_file

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.checkpoint.hf import VALUE_HEAD_FILE
from megatron_save.checkpoint.hf.gather import gather_hf_state
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.models.families import family_for
from megatron_save.models.spec import local_parameter_name

pytestmark = pytest.mark.gpu

# fp32 on a GPU: Transformer Engine may run fp32 GEMMs in TF32 (10-bit mantissa), about 1e-3 off; a wrong weight or
# norm is O(0.1) off on the tiny models (their norm weights are perturbed by 0.1 N(0, 1)).
FP32_RTOL = 1e-2
MIN_TOP1 = 0.9


def _hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    tensors = load_file(hf_dir / "model.safetensors")
    if (hf_dir / VALUE_HEAD_FILE).exists():
        tensors.update(load_file(hf_dir / VALUE_HEAD_FILE))
    return tensors


def _checkpoint_keys(model) -> set[str]:
    """The keys a model's weights are saved under (Megatron's per-module extra state left out)."""
    return {value.key for value in model.sharded_state_dict().values()
            if hasattr(value, "key") and "_extra_state" not in value.key}


@pytest.mark.parametrize("family, kind, value_head", [("qwen3", "causal_lm", False), ("llama", "reward_model", True),
                                                      ("qwen2", "causal_lm", False),
                                                      ("qwen3_moe", "reward_model", True)])
def test_te_parameters_are_the_local_ones_under_te_names(family, kind, value_head, te):
    from megatron_save.models.builder import build_model
    from megatron_save.testing import tiny_hf_config

    config = tiny_hf_config(family, reward_model=kind == "reward_model")
    te_model = build_model(config, kind, spec_backend="te", value_head=value_head)
    local_model = build_model(config, kind, spec_backend="local", value_head=value_head)
    te_names = [name for name, _ in te_model.named_parameters()]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_names
    assert ("decoder.layers.0.pre_mlp_layernorm.weight" in te_names) == (family == "qwen3_moe")
    assert {local_parameter_name(n): tuple(p.shape) for n, p in te_model.named_parameters()} == \
        {n: tuple(p.shape) for n, p in local_model.named_parameters()}
    assert _checkpoint_keys(te_model) == _checkpoint_keys(local_model)


@pytest.mark.parametrize("name", ["llama-lm", "qwen2-lm", "qwen3-lm", "llama-rmv", "qwen3_moe-rmv"])
def test_te_spec_matches_transformers_as_the_local_spec_does(name, tiny_models, tiny_moe_models, te):
    """Both specs load the same (local-spec) checkpoint and are held to the same fp32 reference: spec parity."""
    from megatron_save.checkpoint.parity import (
        chat_sequences,
        parity_batch,
        parity_failures,
        parity_report,
        verdict_line,
    )

    dirs = {**tiny_models, **tiny_moe_models}[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["mg"] / HF_SUBDIR)
    batch = parity_batch(chat_sequences(tokenizer), tokenizer.pad_token_id or 0, 128)
    for spec in ("local", "te"):
        report = parity_report(dirs["mg"], dirs["hf"], batch, spec_backend=spec)
        assert not parity_failures(report, FP32_RTOL, MIN_TOP1), (spec, verdict_line(report, FP32_RTOL, MIN_TOP1))


@pytest.mark.parametrize("name", ["llama-lm", "qwen3_moe-lm"])
def test_weight_sync_from_a_te_spec_policy_into_the_rollout_engine(name, tiny_models, tiny_moe_models, tmp_path, te):
    from megatron_save.rollout import TransformersRolloutEngine
    from megatron_save.testing import save_tiny_hf_model

    dirs = {**tiny_models, **tiny_moe_models}[name]
    policy, _, hf_config = build_model_from_checkpoint(dirs["mg"], spec_backend="te")
    assert any(n.endswith("layer_norm_weight") for n, _ in policy.named_parameters())
    engine = TransformersRolloutEngine(save_tiny_hf_model(name.split("-")[0], tmp_path / "other", seed=11))
    engine.update_weights(gather_hf_state(policy, family_for(hf_config), hf_config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(dirs["hf"]).state_dict()
    for tensor_name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor.cpu(), reference[tensor_name]), tensor_name


def test_bf16_training_step_of_the_te_spec_agrees_with_the_local_spec(tiny_models, tmp_path, te):
    """One bf16 checkpoint, three SFT steps through each spec: same first loss (bf16 rounding apart), both learn;
    the TE model syncs exactly before training and completely after it."""
    from megatron_save.data.batching import DemonstrationBatch
    from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state
    from megatron_save.trainers.sft import sft_loss
    from megatron_save.trainers.step import train_step

    hf_dir = tiny_models["qwen3-lm"]["hf"]
    convert_hf_to_megatron(hf_dir, tmp_path / "bf16", dtype="bf16")
    input_ids, mask = token_batch(batch=4, seq=24)
    batch = DemonstrationBatch(input_ids=input_ids, attention_mask=mask, loss_mask=mask[:, 1:].clone())
    original = _hf_tensors(hf_dir)
    losses = {}
    for spec in ("local", "te"):
        model, _, hf_config = build_model_from_checkpoint(tmp_path / "bf16", spec_backend=spec)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert all(p.is_cuda for p in model.parameters())
        if spec == "te":
            synced = dict(gather_hf_state(model, family_for(hf_config), hf_config))
            assert sorted(synced) == sorted(original)
            assert all(torch.equal(synced[k].cpu(), original[k].to(torch.bfloat16)) for k in original)
        state = build_train_state(model, OptimizerSettings(lr=1e-3), total_steps=4)
        losses[spec] = [train_step(state, [batch], sft_loss, ["loss"])["loss"] for _ in range(3)]
        if spec == "te":
            trained = dict(gather_hf_state(state.model, family_for(hf_config), hf_config))
            assert sorted(trained) == sorted(original)
            assert all(torch.isfinite(t).all() for t in trained.values())
            layer = model.decoder.layers[1]
            assert torch.equal(trained["model.layers.1.input_layernorm.weight"],
                               layer.self_attention.linear_qkv.layer_norm_weight.detach())
            assert torch.equal(trained["model.layers.1.post_attention_layernorm.weight"],
                               layer.mlp.linear_fc1.layer_norm_weight.detach())
            assert not torch.equal(trained["model.layers.1.mlp.down_proj.weight"].cpu(),
                                   original["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
    for spec, values in losses.items():
        assert all(torch.isfinite(torch.tensor(values))) and values[-1] < values[0], (spec, values)
    assert losses["te"][0] == pytest.approx(losses["local"][0], rel=2e-2), losses
