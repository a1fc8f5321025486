"""Stage 3 end to end on CPU through torchrun, as a user launches it: a tiny SAVE run with the models at TP=2,
the same first step at every parallel layout, and an interrupted run resumed to the exact parameters."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import read_metrics, run_stage3

from megatron_save.checkpoint import build_model_from_checkpoint


def _parameters(checkpoint) -> dict[str, torch.Tensor]:
    model, _, _ = build_model_from_checkpoint(checkpoint)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.fixture(scope="module")
def save_run(tiny_models, rl_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage3") / "save_tp2"
    run_stage3(2, out, tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"],
               "total_steps=4", "save_every=2")
    return out


def test_tiny_save_run_trains_all_three_parts(save_run, tiny_models, world_of_one):
    records = read_metrics(save_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for name in ("rm/value_loss", "rm/reward_loss", "policy/pg_loss", "policy/kl_loss", "policy/grad_norm"):
            assert record[name] is not None and math.isfinite(record[name]), (record["step"], name)
    assert any(r["rm/reward_loss"] > 0 for r in records), [r["rm/reward_loss"] for r in records]
    for name in ("time/rollout_s", "time/rm_update_s", "time/policy_update_s", "time/weight_sync_s",
                 "filter/keep_rate", "filter/kept_prompts_fraction", "policy/entropy", "rollout/response_length"):
        assert name in records[-1]
    assert list((save_run / "tensorboard").glob("events.out.tfevents.*"))

    before_rm, after_rm = _parameters(tiny_models["llama-rmv"]["mg"]), _parameters(save_run / "reward_model")
    value_head = "output_layer.value_head.weight"
    assert not torch.equal(before_rm[value_head], after_rm[value_head])
    backbone = [n for n in before_rm if n.startswith("decoder.")]
    assert any(not torch.equal(before_rm[n], after_rm[n]) for n in backbone), "RM backbone unchanged"
    before_policy, after_policy = _parameters(tiny_models["llama-lm"]["mg"]), _parameters(save_run / "policy")
    assert any(not torch.equal(before_policy[n], after_policy[n]) for n in before_policy), "policy unchanged"


@pytest.mark.parametrize("layout", ["tp1", "pp2", "tp2pp2"])
def test_first_step_matches_across_layouts(layout, save_run, tiny_models, rl_data, tmp_path):
    """The TP=2 run's first step (rollouts, RM update, policy update) at TP=1, PP=2 and TP=2 x PP=2."""
    tp, pp = {"tp1": (1, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}[layout]
    run_stage3(tp * pp, tmp_path / layout, tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"],
               rl_data["prompts"], "total_steps=4", "exit_after_steps=1", f"parallel.tensor_model_parallel_size={tp}",
               f"parallel.pipeline_model_parallel_size={pp}")
    _same_step(read_metrics(save_run)[0], read_metrics(tmp_path / layout)[0])


def _same_step(reference: dict, record: dict) -> None:
    compared = [k for k in reference if k.split("/")[0] in ("rm", "r2m", "policy", "filter", "filter_after_rm_update",
                                                           "rollout") and reference[k] is not None]
    assert len(compared) > 15 and any(k.startswith("rm/") for k in compared)
    for name in compared:
        assert record[name] == pytest.approx(reference[name], rel=1e-4, abs=1e-5), name


def test_megatron_rollouts_and_r2m_match_across_layouts(tiny_models, rl_data, tmp_path):
    """rollout.backend=megatron (sampling with the sharded policy) with the R2M strategy (policy hidden states into
    a replicated head): TP=2 x PP=2 gives TP=1's first step."""
    for name, (tp, pp) in (("tp1", (1, 1)), ("tp2pp2", (2, 2))):
        run_stage3(tp * pp, tmp_path / name, tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"],
                   rl_data["prompts"], "total_steps=4", "exit_after_steps=1", "rollout.backend=megatron",
                   "reward.strategy=r2m", "reward.r2m_width=16", "reward.optim.lr=1e-2",
                   f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}")
    reference = read_metrics(tmp_path / "tp1")[0]
    assert reference["rm/grebt_loss"] > 0
    _same_step(reference, read_metrics(tmp_path / "tp2pp2")[0])


def test_resumed_run_ends_with_the_uninterrupted_parameters(tiny_models, rl_data, tmp_path, world_of_one):
    """Two data-parallel ranks: 3 steps straight vs 2 steps, exit, relaunch; identical parameters. The resumed
    launches also offload idle state between phases (gradient buffers freed; optimizer and reference moves, which
    have nothing to move on CPU), which must change nothing either, checkpoints written and read included."""
    common = (tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"], "total_steps=3",
              "reward.strategy=save", "parallel.tensor_model_parallel_size=1", "prompts_per_step=4")
    offload = ("offload.gradients=true", "offload.optimizer=true", "offload.reference=true")
    run_stage3(2, tmp_path / "straight", *common)
    run_stage3(2, tmp_path / "resumed", *common, *offload, "exit_after_steps=2")
    assert not (tmp_path / "resumed" / "policy").exists()
    run_stage3(2, tmp_path / "resumed", *common, *offload)
    for model in ("policy", "reward_model"):
        straight, resumed = _parameters(tmp_path / "straight" / model), _parameters(tmp_path / "resumed" / model)
        for name, value in straight.items():
            assert torch.equal(value, resumed[name]), f"{model}: {name} differs after resume"
    assert read_metrics(tmp_path / "straight")[-1]["policy/pg_loss"] == read_metrics(tmp_path / "resumed")[-1][
        "policy/pg_loss"]
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
