"""Activation recompute settings: validation naming the setting, the mapping onto Megatron-Core's
TransformerConfig (which Megatron accepts, with sequence parallelism too), the refusals of a setting that would do
nothing, and, in this process, that a local-spec model recomputes (full and selective) with the same gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from megatron_save.config import RecomputeSettings, check_recompute, load_config
from megatron_save.models.gpt_config import recompute_arguments
from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config

HAS_RECOMPUTE_MODULES = "recompute_modules" in {f.name for f in dataclasses.fields(TransformerConfig)}


@pytest.mark.parametrize("settings, layers, message", [
    (RecomputeSettings("x"), None, r"policy.recompute.granularity='x' is not one of null, full, selective"),
    (RecomputeSettings("full", "chunk"), None, r"policy.recompute.method='chunk' is not one of uniform, block"),
    (RecomputeSettings("full", num_layers=0), None, r"policy.recompute.num_layers=0 must be an integer >= 1"),
    (RecomputeSettings("selective", "block"), None, r"policy.recompute.method='block'.*granularity=full only"),
    (RecomputeSettings(None, num_layers=2), None, r"policy.recompute.num_layers=2 apply.*granularity=full only"),
    (RecomputeSettings("full", num_layers=3), 4, r"num_layers=3 with policy.recompute.method=uniform must divide "
                                                  r"the 4 transformer layers of each pipeline stage"),
    (RecomputeSettings("full", "block", 5), 4, r"policy.recompute.num_layers=5 exceeds the 4 transformer layers"),
])
def test_bad_settings_are_refused_naming_the_setting(settings, layers, message):
    with pytest.raises(ValueError, match=message):
        check_recompute(settings, "policy.recompute", layers)


@pytest.mark.parametrize("settings", [RecomputeSettings(), RecomputeSettings("full"),
                                      RecomputeSettings("full", num_layers=2), RecomputeSettings("full", "block", 3),
                                      RecomputeSettings("selective")])
def test_valid_settings_pass(settings):
    check_recompute(settings, "recompute", 4)


def test_the_mapping_onto_transformer_config():
    assert recompute_arguments(RecomputeSettings(), 4) == {}
    assert recompute_arguments(RecomputeSettings("full"), 4) == dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert recompute_arguments(RecomputeSettings("full", "block", 3), 4) == dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=3)
    selective = recompute_arguments(RecomputeSettings("selective"), 4)
    assert selective == {"recompute_granularity": "selective",
                         **({"recompute_modules": ["core_attn"]} if HAS_RECOMPUTE_MODULES else {})}
    with pytest.raises(ValueError, match="reward.recompute.num_layers=3"):
        recompute_arguments(RecomputeSettings("full", num_layers=3), 2, "reward.recompute")


@pytest.mark.parametrize("settings", [RecomputeSettings("full"), RecomputeSettings("full", "block", 2),
                                      RecomputeSettings("selective")])
@pytest.mark.parametrize("tp, pp, sp", [(1, 1, False), (2, 2, True)])
def test_megatron_accepts_the_mapped_settings(settings, tp, pp, sp):
    """TransformerConfig's own checks pass, with sequence parallelism too (Megatron refuses only
    distribute_saved_activations with it, which the mapping never sets)."""
    config = TransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2, tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, sequence_parallel=sp,
                               **recompute_arguments(settings, 4 // pp))
    assert config.recompute_granularity == settings.granularity
    assert not config.distribute_saved_activations
    if settings.granularity == "full":
        assert (config.recompute_method, config.recompute_num_layers) == (settings.method, settings.num_layers)
    elif HAS_RECOMPUTE_MODULES:
        assert config.recompute_modules == ["core_attn"]


def test_stage_configs_take_recompute_from_yaml_overrides():
    from megatron_save.trainers.sft import SFTConfig
    from megatron_save.trainers.stage1_bt import Stage1Config
    from megatron_save.trainers.stage2_value import Stage2Config

    required = ["checkpoint=c", "output_dir=o", "data.train_data=d"]
    for schema in (Stage1Config, Stage2Config, SFTConfig):
        cfg = load_config(schema, None, [*required, "recompute.granularity=full", "recompute.method=block",
                                         "recompute.num_layers=2"])
        assert cfg.recompute == RecomputeSettings("full", "block", 2)
    cfg = load_config(Stage3Config, None, ["output_dir=o", "train_data=d", "policy.checkpoint=p",
                                           "reward.checkpoint=r", "policy.recompute.granularity=selective",
                                           "reward.recompute.granularity=full", "reward.prime.recompute.num_layers=2"])
    assert cfg.policy.recompute.granularity == "selective" and cfg.reward.recompute.granularity == "full"
    assert cfg.reward.prime.recompute == RecomputeSettings(None, "uniform", 2)
    with pytest.raises(ValueError, match="recompute.num_layers"):
        load_config(Stage1Config, None, [*required, "recompute.num_layers=two"])


def test_check_settings_refuses_bad_recompute_of_stages_1_2_and_sft(tmp_path):
    from megatron_save.checkpoint.model_checkpoint import META_FILE
    from megatron_save.trainers.common import check_settings
    from megatron_save.trainers.stage1_bt import Stage1Config

    (tmp_path / META_FILE).write_text("{}")
    cfg = Stage1Config(checkpoint=str(tmp_path), output_dir=str(tmp_path / "out"),
                       recompute=RecomputeSettings("all"))
    cfg.data.train_data = "hub/dataset"
    with pytest.raises(ValueError, match=r"recompute.granularity='all' is not one of"):
        check_settings(cfg)


def _stage3(**changes) -> Stage3Config:
    cfg = Stage3Config(output_dir="o", train_data="d", save_final_checkpoint=False)
    for path, value in changes.items():
        target = cfg
        *parents, name = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    return cfg


@pytest.mark.parametrize("changes, message", [
    (dict(policy__recompute=RecomputeSettings("sometimes")), r"policy.recompute.granularity='sometimes'"),
    (dict(policy__frozen=True, policy__recompute=RecomputeSettings("full")),
     r"policy.recompute.granularity=full does nothing: policy.frozen=true"),
    (dict(reward__strategy="frozen", reward__recompute=RecomputeSettings("full")),
     r"reward.recompute.granularity=full does nothing: reward.strategy=frozen does not train"),
    (dict(reward__strategy="r2m", reward__recompute=RecomputeSettings("selective")),
     r"reward.recompute.granularity=selective does nothing: reward.strategy=r2m"),
    (dict(reward__prime__recompute=RecomputeSettings("full")),
     r"reward.prime.recompute.granularity=full does nothing: reward.strategy=save has no implicit PRM"),
    (dict(reward__prime__recompute=RecomputeSettings("full", "diagonal")), r"reward.prime.recompute.method='diagonal'"),
])
def test_stage3_refuses_recompute_that_cannot_work_or_does_nothing(changes, message):
    with pytest.raises(ValueError, match=message):
        check_stage3_config(_stage3(**changes))


def test_stage3_accepts_recompute_on_every_trained_model():
    check_stage3_config(_stage3(policy__recompute=RecomputeSettings("full"),
                                reward__recompute=RecomputeSettings("selective")))
    check_stage3_config(_stage3(reward__strategy="prime", policy__advantage="rloo",
                                reward__prime__recompute=RecomputeSettings("full", "block", 2)))


@pytest.mark.parametrize("granularity, recomputed", [("full", "layer"), ("selective", "core_attn")])
def test_the_local_spec_recomputes_with_the_same_gradients(world_of_one, granularity, recomputed):
    """In this process (CPU, local spec): one forward-backward of a tiny causal LM built with recompute gives the
    gradients of the model built without, bitwise, and the recomputed modules ran forward twice."""
    from megatron_save.models.builder import build_model
    from megatron_save.testing import tiny_hf_config

    hf_config = tiny_hf_config("llama")
    tokens = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, -1)
    plain = build_model(hf_config, "causal_lm", spec_backend="local")
    model = build_model(hf_config, "causal_lm", spec_backend="local", recompute=RecomputeSettings(granularity))
    model.load_state_dict(plain.state_dict())
    calls = {"layer": 0, "core_attn": 0}
    layer = model.decoder.layers[0]
    layer.register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
    layer.self_attention.core_attention.register_forward_hook(
        lambda *_: calls.__setitem__("core_attn", calls["core_attn"] + 1))
    gradients = []
    for each in (plain, model):
        each.train()
        each(tokens, positions, None).float().square().mean().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in each.parameters()]))
    assert torch.equal(gradients[0], gradients[1])
    assert calls == {"layer": 2 if recomputed == "layer" else 1, "core_attn": 2}


def test_layer_counts_are_checked_against_the_layout_before_anything_starts(tiny_models, rl_data, tmp_path):
    """The tiny models have 4 layers: at PP=2 each stage holds 2. Stage 3 (each trained model) and the stages that
    start from one checkpoint refuse num_layers the layout cannot take, before any process group exists."""
    from megatron_save.config import ParallelConfig
    from megatron_save.trainers.common import start_from_checkpoint
    from megatron_save.trainers.stage3.run import build_stage3_run

    with pytest.raises(ValueError, match=r"^recompute.num_layers=3 exceeds the 2 transformer layers"):
        start_from_checkpoint(str(tiny_models["llama-rmv"]["mg"]), ParallelConfig(pipeline_model_parallel_size=2),
                              recompute=RecomputeSettings("full", "block", 3))
    base = dict(output_dir=str(tmp_path), train_data=str(rl_data["prompts"]))
    for name, settings, message in (
            ("policy", RecomputeSettings("full", num_layers=3), r"policy.recompute.num_layers=3 with policy.recompute"
                                                                 r".method=uniform must divide the 4 transformer"),
            ("reward", RecomputeSettings("full", "block", 5), r"reward.recompute.num_layers=5 exceeds the 4")):
        cfg = Stage3Config(**base)
        cfg.policy.checkpoint, cfg.reward.checkpoint = str(tiny_models["llama-lm"]["mg"]), str(
            tiny_models["llama-rmv"]["mg"])
        getattr(cfg, name).recompute = settings
        with pytest.raises(ValueError, match=message):
            build_stage3_run(cfg)


def test_a_run_may_resume_with_other_recompute_settings():
    """Recompute changes memory, not results: a stage-3 run that ran out of memory resumes with it switched on."""
    from dataclasses import asdict

    from megatron_save.checkpoint.run_checkpoint import settings_changes
    from megatron_save.trainers.stage3.config import RESUMABLE_CHANGES

    saved = asdict(_stage3())
    cfg = _stage3(policy__recompute=RecomputeSettings("full", "block", 2),
                  reward__recompute=RecomputeSettings("selective"), reward__prime__recompute=RecomputeSettings("full"))
    assert settings_changes(saved, asdict(cfg), RESUMABLE_CHANGES) == []
    cfg.policy.kl_coef = 0.5
    assert settings_changes(saved, asdict(cfg), RESUMABLE_CHANGES) == ["policy.kl_coef: 0.04 -> 0.5"]
