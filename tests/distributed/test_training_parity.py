"""Training steps give the same numbers at TP=2, PP=2, TP=2 x PP=2 and with the distributed optimizer as at TP=1.

Three stage-1 (BT) steps, then two stage-2 steps (value head only, backbone frozen), then R and V on a fixed
batch, from the same checkpoint and the same global batches (4 gloo processes; data parallelism fills the rest);
and three SFT steps of a causal LM (vocabulary-parallel cross entropy) with its held-out loss.
"""

from __future__ import annotations

import random

import pytest
from helpers import read_json, torchrun

from megatron_save.testbed.task import GoldTaskSettings, demonstration, make_prompt
from megatron_save.testing.synthetic import synthetic_preference_rows, write_jsonl

RUNS = ["tp2", "pp2", "tp2pp2", "tp1_distopt", "tp2pp2_distopt"]


@pytest.fixture(scope="module")
def training_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    pairs = write_jsonl(synthetic_preference_rows(32, seed=3), root / "pairs.jsonl")
    rng, task = random.Random(5), GoldTaskSettings()
    prompts = [make_prompt(rng, task) for _ in range(32)]
    demonstrations = write_jsonl([{"prompt": p, "response": demonstration(rng, p, task)} for p in prompts],
                                 root / "demonstrations.jsonl")
    torchrun("training_worker.py", 4, "--ckpt", str(tiny_models["llama-rmv"]["mg"]), "--pairs", str(pairs),
             "--lm-ckpt", str(tiny_models["llama-lm"]["mg"]), "--demonstrations", str(demonstrations),
             "--out", str(root / "results.json"))
    return read_json(root / "results.json")


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
