"""Stage 3 end to end on CPU through torchrun, as a user launches it: a tiny SAVE run with the models at TP=2,
the same first step at every parallel layout (TP=1 in this process), and a run resumed from a checkpoint to the
exact parameters."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import read_metrics, run_stage3, run_stage3_in_process, stage3_overrides, torchrun

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
    # What the run reports each step: the filter (keep rate, |B~| / |B|, |Y+| and |Y-|, the anchor's
    # calibration, reward mean / std) before and after the RM update, the RM and policy losses, KL, entropy, clip
    # fraction, response length, throughput, and the time of every phase.
    reported = [f"{when}/{name}" for when in ("filter", "filter_after_rm_update") for name in (
        "keep_rate", "kept_prompts_fraction", "positives_per_prompt", "negatives_per_prompt", "anchor_bias",
        "anchor_abs_error", "reward_mean", "reward_std", "threshold_mu")]
    reported += ["rm/reward_loss", "rm/value_loss", "policy/pg_loss", "policy/kl_loss", "policy/kl_to_reference",
                 "policy/entropy", "policy/clip_fraction", "rollout/response_length", "rollout/truncated_fraction",
                 "throughput/response_tokens_per_s", "memory/host_peak_rss_gib", "time/step_s"]
    # No "score" phase: the RM update's own forward scores the batch.
    reported += [f"time/{phase}_s" for phase in ("rollout", "rm_update", "rescore", "policy_logprobs",
                                                 "policy_update", "weight_sync")]
    for record in records:
        missing = [name for name in reported if record.get(name) is None or not math.isfinite(record[name])]
        assert not missing, (record["step"], missing)
    assert all(0 <= r["filter/keep_rate"] <= 1 and r["throughput/response_tokens_per_s"] > 0 for r in records)
    # The cost structure of a SAVE step with one policy mini-batch: the fused RM update and the re-score, the
    # policy update whose own forward gives the old log-probs, the reference for the KL term.
    for record in records:
        assert "time/score_s" not in record
        assert {k: v for k, v in record.items() if k.startswith("passes/")} == {
            "passes/reward_forward": 2, "passes/reward_backward": 1, "passes/policy_forward": 1,
            "passes/policy_backward": 1, "passes/reference_forward": 1}, record["step"]
    assert list((save_run / "tensorboard").glob("events.out.tfevents.*"))

    before_rm, after_rm = _parameters(tiny_models["llama-rmv"]["mg"]), _parameters(save_run / "reward_model")
    value_head = "output_layer.value_head.weight"
    assert not torch.equal(before_rm[value_head], after_rm[value_head])
    backbone = [n for n in before_rm if n.startswith("decoder.")]
    assert any(not torch.equal(before_rm[n], after_rm[n]) for n in backbone), "RM backbone unchanged"
    before_policy, after_policy = _parameters(tiny_models["llama-lm"]["mg"]), _parameters(save_run / "policy")
    assert any(not torch.equal(before_policy[n], after_policy[n]) for n in before_policy), "policy unchanged"


LAYOUTS = {"tp1": (1, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
MEGATRON_R2M = ("rollout.backend=megatron", "reward.strategy=r2m", "reward.r2m_width=16", "reward.optim.lr=1e-2")
PRIME = ("reward.strategy=prime", "policy.advantage=rloo", "reward.prime.optim.lr=1e-2",
         "reward.prime.accuracy_low=0.0", "reward.prime.recompute_after_update=true")


def _first_step_settings(layout: str, output_dir, tiny_models, rl_data, *overrides: str) -> tuple:
    """run_stage3's arguments for step 1 of a run at ``layout``."""
    tp, pp = LAYOUTS[layout]
    return (output_dir, tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"],
            "total_steps=4", "exit_after_steps=1", f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}", *overrides)


@pytest.fixture(scope="module")
def tp2pp2_first_steps(tiny_models, rl_data, tmp_path_factory) -> dict[str, dict]:
    """Step 1 at TP=2 x PP=2 of the default config, of the Megatron-Core rollout backend with R2M, and of PRIME:
    the runs in one 4-process launch (one start-up)."""
    root = tmp_path_factory.mktemp("tp2pp2")
    runs = {"default": (), "megatron_r2m": MEGATRON_R2M, "prime": PRIME}
    arguments = []
    for name, overrides in runs.items():
        settings = _first_step_settings("tp2pp2", root / name, tiny_models, rl_data, *overrides)
        arguments += ["--settings", json.dumps(stage3_overrides(*settings))]
    torchrun("stage3_runs_worker.py", 4, *arguments)
    return {name: read_metrics(root / name)[0] for name in runs}


@pytest.mark.parametrize("layout", ["tp1", "pp2", "tp2pp2"])
def test_first_step_matches_across_layouts(layout, save_run, tiny_models, rl_data, tmp_path, world_of_one,
                                           request):
    """The TP=2 run's first step (rollouts, RM update, policy update) at TP=1 (in this process), PP=2 and
    TP=2 x PP=2."""
    if layout == "tp2pp2":
        record = request.getfixturevalue("tp2pp2_first_steps")["default"]
    else:
        settings = _first_step_settings(layout, tmp_path / layout, tiny_models, rl_data)
        run_stage3_in_process(*settings) if layout == "tp1" else run_stage3(2, *settings)
        record = read_metrics(tmp_path / layout)[0]
    _same_step(read_metrics(save_run)[0], record)


def _same_step(reference: dict, record: dict) -> None:
    compared = [k for k in reference if k.split("/")[0] in ("rm", "r2m", "prm", "policy", "filter",
                                                           "filter_after_rm_update", "rollout", "passes")
                and reference[k] is not None]
    assert len(compared) > 15 and any(k.startswith("rm/") for k in compared)
    for name in compared:
        assert record[name] == pytest.approx(reference[name], rel=1e-4, abs=1e-5), name


def test_megatron_rollouts_and_r2m_match_across_layouts(tp2pp2_first_steps, tiny_models, rl_data, tmp_path,
                                                        world_of_one):
    """rollout.backend=megatron (sampling with the sharded policy) with the R2M strategy (policy hidden states into
    a replicated head): TP=2 x PP=2 gives TP=1's first step."""
    run_stage3_in_process(*_first_step_settings("tp1", tmp_path / "tp1", tiny_models, rl_data, *MEGATRON_R2M))
    reference = read_metrics(tmp_path / "tp1")[0]
    assert reference["rm/grebt_loss"] > 0
    _same_step(reference, tp2pp2_first_steps["megatron_r2m"])


def test_prime_matches_across_layouts(tp2pp2_first_steps, tiny_models, rl_data, tmp_path, world_of_one):
    """PRIME through the whole loop (labels, accuracy filter, PRM update and double forward, its advantages, the
    policy update): TP=2 x PP=2 gives TP=1's first step."""
    run_stage3_in_process(*_first_step_settings("tp1", tmp_path / "tp1", tiny_models, rl_data, *PRIME))
    reference = read_metrics(tmp_path / "tp1")[0]
    assert reference["prm/loss"] > 0 and reference["passes/prm_forward"] == 3
    _same_step(reference, tp2pp2_first_steps["prime"])
    assert tp2pp2_first_steps["prime"]["prm/loss"] == pytest.approx(reference["prm/loss"], rel=1e-4)


def test_resumed_run_ends_with_the_uninterrupted_parameters(tiny_models, rl_data, tmp_path, world_of_one):
    """Two data-parallel ranks: a 3-step run checkpointed after every step, and a copy of what it held after step
    2 resumed from there; identical parameters and last step. The resumed launch also offloads idle state between
    phases (gradient buffers freed; optimizer and reference moves, which have nothing to move on CPU), which must
    change nothing either. (exit_after_steps, which ends a launch with such a checkpoint, is tested in process.)"""
    common = (tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"], "total_steps=3",
              "save_every=1", "keep_checkpoints=3", "reward.strategy=save", "parallel.tensor_model_parallel_size=1",
              "prompts_per_step=4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage3(2, straight, *common)
    # The run directory as an interruption after step 2 leaves it: no step-3 checkpoint, no final models.
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("step_000003"))
    for final_model in ("policy", "reward_model"):
        shutil.rmtree(resumed / final_model)
    (resumed / "checkpoints" / "latest").write_text("step_000002\n")
    run_stage3(2, resumed, *common, "offload.gradients=true", "offload.optimizer=true", "offload.reference=true")
    for model in ("policy", "reward_model"):
        expected, actual = _parameters(straight / model), _parameters(resumed / model)
        for name, value in expected.items():
            assert torch.equal(value, actual[name]), f"{model}: {name} differs after resume"
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3]
    assert read_metrics(straight)[-1] == {**read_metrics(resumed)[-1], **_timings(read_metrics(straight)[-1])}


def _timings(record: dict) -> dict:
    """What may differ between two runs of the same step: wall times, throughput and memory."""
    return {k: v for k, v in record.items() if k.startswith(("time/", "throughput/", "memory/"))}
