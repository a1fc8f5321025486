"""Activation recompute changes memory, not results: the policy update, a stage-1 (BT) step and the fused SAVE
reward-model step give the same losses, gradient norms and updated parameters with full (uniform and block) and
selective recompute as without, at TP=2 and at PP=2; and a tiny stage-3 SAVE run at TP=2 with
``policy.recompute.granularity=full reward.recompute.granularity=full`` builds its policy and reward model (not the
reference) with recompute and logs the same metrics as without, and a PRIME run builds its implicit PRM with
``reward.prime.recompute``. Hooks on
every transformer layer and core attention count their forward calls during training, so a recompute setting that
never reached Megatron (or that Megatron ignored) fails here: recomputing runs a module's forward again in the
backward. Everything runs in one 2-process launch (tests/distributed/workers/recompute_worker.py)."""

from __future__ import annotations

import json

import pytest
from helpers import read_json, read_metrics, stage3_overrides, torchrun

LAYOUTS = ("tp2", "pp2")
CASES = ("full", "full_block", "selective")
PARTS = ("policy", "bt", "save")
METRICS = {"policy": ("policy/pg_loss", "policy/kl_loss", "policy/grad_norm", "policy/clip_fraction"),
           "bt": ("loss", "accuracy", "grad_norm"),
           "save": ("rm/reward_loss", "rm/value_loss", "rm/grad_norm", "reward_count", "rewards", "values")}

RTOL = 1e-6
"""Recompute replays the same operations on the same inputs (Megatron restores the RNG state before replaying), so
the gradients are the same numbers; measured on this CPU (AMD EPYC, one thread a process): bitwise equal, a
relative difference of 0 in every loss, gradient norm and parameter at both layouts. The bound allows a few unit
roundoffs (6e-8) in case a BLAS picks another kernel for the replayed forward's freshly allocated buffers; a
recompute that changed the computation (a wrong layer replayed, a lost RNG state) moves them by far more."""

PRIME = ("reward.strategy=prime", "policy.advantage=rloo", "reward.prime.optim.lr=1e-2",
         "reward.prime.accuracy_low=0.0")
RUN_METRICS = ("rm/", "policy/", "filter/", "filter_after_rm_update/", "rollout/", "passes/")


@pytest.fixture(scope="module")
def recompute_runs(tiny_models, rl_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("recompute")
    runs = {"plain": ("total_steps=2",),
            "recompute": ("total_steps=2", "policy.recompute.granularity=full", "reward.recompute.granularity=full"),
            "prime": ("total_steps=1", *PRIME, "policy.recompute.granularity=full",
                      "reward.prime.recompute.granularity=full")}
    stage3 = []
    for name, overrides in runs.items():
        stage3 += ["--stage3", json.dumps(stage3_overrides(
            root / name, tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"],
            "save_every=0", "save_final_checkpoint=false", "tensorboard=false", *overrides))]
    torchrun("recompute_worker.py", 2, "--policy", str(tiny_models["llama-lm"]["mg"]), "--reward",
             str(tiny_models["llama-rmv"]["mg"]), "--out", str(root / "steps.json"), *stage3)
    return read_json(root / "steps.json"), {name: read_metrics(root / name) for name in runs}


def _close(actual, expected) -> bool:
    actual = actual if isinstance(actual, list) else [actual]
    expected = expected if isinstance(expected, list) else [expected]
    scale = max(abs(e) for e in expected) or 1.0
    return len(actual) == len(expected) and all(abs(a - e) <= RTOL * scale for a, e in zip(actual, expected))


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_step_with_recompute_equals_the_step_without(recompute_runs, layout, case, part):
    steps, _ = recompute_runs
    plain, recomputed = steps[layout]["none"][part], steps[layout][case][part]
    for name in METRICS[part]:
        assert _close(recomputed["metrics"][name], plain["metrics"][name]), (name, recomputed["metrics"][name],
                                                                             plain["metrics"][name])
    assert recomputed["param_rel_diff"] <= RTOL
    assert plain["metrics"][METRICS[part][0]] != 0  # the step computed something


EXPECTED_CONFIG = {"none": [None, None, None], "full": ["full", "uniform", 1], "full_block": ["full", "block", 1],
                   "selective": ["selective", None, None]}


@pytest.mark.parametrize("case", ["none", *CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_recomputes_what_the_setting_says(recompute_runs, layout, case):
    """Against the run without recompute (each module one forward per micro-batch): full uniform runs every layer
    again in the backward, full block (num_layers=1) only the first layer of each pipeline stage, selective only
    each layer's core attention. A micro-batch whose loss does not reach a layer has no backward through it, so
    "again" means more calls, at most twice as many."""
    steps, _ = recompute_runs
    for part in PARTS:
        result, plain = steps[layout][case][part], steps[layout]["none"][part]
        config = result["config"]
        assert [config["recompute_granularity"], config["recompute_method"],
                config["recompute_num_layers"]] == EXPECTED_CONFIG[case], part
        for kind in ("layer", "core_attn"):
            for rank, (counts, plain_counts) in enumerate(zip(result["counts"][kind], plain["counts"][kind])):
                assert all(c > 0 for c in plain_counts), (part, kind, rank)
                if case == "full" or (case == "selective" and kind == "core_attn"):
                    recomputed = [True] * len(counts)
                elif case == "full_block":
                    recomputed = [index == 0 for index in range(len(counts))]
                else:
                    recomputed = [False] * len(counts)
                for index, (count, plain_count, again) in enumerate(zip(counts, plain_counts, recomputed)):
                    where = (part, kind, f"rank {rank}", f"layer {index}")
                    if again:
                        assert plain_count < count <= 2 * plain_count, (where, count, plain_count)
                    else:
                        assert count == plain_count, (where, count, plain_count)


def test_a_stage3_save_run_logs_the_same_with_recompute(recompute_runs):
    steps, runs = recompute_runs
    # What the runs built: the trained policy and reward model with recompute, the reference never.
    assert steps["stage3_models"] == {
        "plain": [["llama-lm-mg", None], ["llama-lm-mg", None], ["llama-rmv-mg", None]],
        "recompute": [["llama-lm-mg", "full"], ["llama-lm-mg", None], ["llama-rmv-mg", "full"]],
        # PRIME: the reward model stays frozen; the implicit PRM trains, its reference (the policy's) does not.
        "prime": [["llama-lm-mg", "full"], ["llama-lm-mg", None], ["llama-rmv-mg", None], ["llama-lm-mg", "full"]]}
    (prime,) = runs["prime"]
    assert prime["prm/loss"] > 0 and prime["policy/grad_norm"] > 0
    plain, recomputed = runs["plain"], runs["recompute"]
    assert [r["step"] for r in plain] == [r["step"] for r in recomputed] == [1, 2]
    compared = 0
    for before, after in zip(plain, recomputed):
        for name, value in before.items():
            if name.startswith(RUN_METRICS) and value is not None:
                assert _close(after[name], value), (before["step"], name, after[name], value)
                compared += 1
    assert compared > 30 and any(r["rm/reward_loss"] > 0 for r in plain)
