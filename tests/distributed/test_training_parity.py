"""Training steps give the same numbers at TP=2, PP=2, TP=2 x PP=2 and with the distributed optimizer as at TP=1;
a Qwen3-MoE model's at EP=2, PP=2, PP=2 x EP=2 and EP=2 with the distributed optimizer (MoE training at TP > 1
needs sequence parallelism, which needs the Transformer Engine spec: a GPU item).

Three stage-1 (BT) steps, then two stage-2 steps (value head only, backbone frozen), then R and V on a fixed
batch, from the same checkpoint and the same global batches (4 gloo processes; data parallelism fills the rest);
and three SFT steps of a causal LM (vocabulary-parallel cross entropy) with its held-out loss.
"""

from __future__ import annotations

import random

import pytest
from helpers import MOE_LAYOUTS, read_json, torchrun

from megatron_save.testbed.task import GoldTaskSettings, demonstration, make_prompt
from megatron_save.testing.synthetic import synthetic_preference_rows, write_jsonl

RUNS = ["tp2", "pp2", "tp2pp2", "tp1_distopt", "tp2pp2_distopt"]


def _training_run(root, rm_ckpt, lm_ckpt, *flags):
    pairs = write_jsonl(synthetic_preference_rows(32, seed=3), root / "pairs.jsonl")
    rng, task = random.Random(5), GoldTaskSettings()
    prompts = [make_prompt(rng, task) for _ in range(32)]
    demonstrations = write_jsonl([{"prompt": p, "response": demonstration(rng, p, task)} for p in prompts],
                                 root / "demonstrations.jsonl")
    torchrun("training_worker.py", 4, "--ckpt", str(rm_ckpt), "--pairs", str(pairs), "--lm-ckpt", str(lm_ckpt),
             "--demonstrations", str(demonstrations), "--out", str(root / "results.json"), *flags)
    return read_json(root / "results.json")


@pytest.fixture(scope="module")
def training_run(tiny_models, tmp_path_factory):
    return _training_run(tmp_path_factory.mktemp("training"), tiny_models["llama-rmv"]["mg"],
                         tiny_models["llama-lm"]["mg"])


@pytest.fixture(scope="module")
def moe_training_run(tiny_moe_models, tmp_path_factory):
    """The same steps of a Qwen3-MoE reward model and causal LM (load-balancing loss on) at the MoE layouts."""
    return _training_run(tmp_path_factory.mktemp("moe_training"), tiny_moe_models["qwen3_moe-rmv"]["mg"],
                         tiny_moe_models["qwen3_moe-lm"]["mg"], "--moe")


def test_reference_run_trains(training_run):
    reference = training_run["tp1"]
    assert reference["bt_loss"][-1] < reference["bt_loss"][0]
    assert reference["value_loss"][-1] != reference["value_loss"][0]
    assert reference["sft_loss"][-1] < reference["sft_loss"][0]


@pytest.mark.parametrize("run", RUNS)
def test_matches_tp1(training_run, run):
    reference, other = training_run["tp1"], training_run[run]
    for key in ("bt_loss", "value_loss", "rewards", "values", "sft_loss", "sft_held_out"):
        assert other[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-5), key


def test_moe_reference_run_trains(moe_training_run):
    reference = moe_training_run["tp1"]
    assert reference["bt_loss"][-1] < reference["bt_loss"][0]
    assert reference["sft_loss"][-1] < reference["sft_loss"][0]


@pytest.mark.parametrize("run", [*[name for name, layout in MOE_LAYOUTS.items() if layout[0] == 1][1:], "ep2_distopt"])
def test_moe_matches_tp1(moe_training_run, run):
    reference, other = moe_training_run["tp1"], moe_training_run[run]
    for key in ("bt_loss", "value_loss", "rewards", "values", "sft_loss", "sft_held_out"):
        assert other[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-5), key
