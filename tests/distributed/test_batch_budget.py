"""Token-budget micro-batches of stages 1, 2 and SFT (``batch.max_tokens_per_micro_batch``) give the same step as
fixed micro-batches: loss, metrics, gradient norm and updated weights, at DP=2 (the ranks agree one micro-batch
count) and PP=2 (micro-batches of different widths through the pipeline), one torchrun launch of 2 gloo processes.

Tolerance 1e-6 relative (fp32): the budget groups and pads rows differently, so sums round differently (about 1e-7
of their scale); the step uses Adam with eps = 1 and lr = 1 (tests/distributed/workers/token_budget_worker.py says
why: at the default eps the first Adam step amplifies a near-zero gradient element's rounding by lr / eps), so the
updated weights compare the gradients themselves.
"""

from __future__ import annotations

import random

import pytest
from helpers import read_json, torchrun

from megatron_save.testbed.task import GoldTaskSettings, demonstration, make_prompt
from megatron_save.testing.synthetic import synthetic_preference_rows, write_jsonl

STAGES = {"stage1": ("loss", "accuracy", "grad_norm"), "stage2": ("loss", "grad_norm"), "sft": ("loss", "grad_norm")}


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_budget")
    pairs = write_jsonl(synthetic_preference_rows(8, seed=3), root / "pairs.jsonl")
    rng, task = random.Random(5), GoldTaskSettings()
    demonstrations = write_jsonl([{"prompt": p, "response": demonstration(rng, p, task)}
                                  for p in (make_prompt(rng, task) for _ in range(8))], root / "demonstrations.jsonl")
    torchrun("batch_budget_worker.py", 2, "--reward", str(tiny_models["llama-rmv"]["mg"]), "--policy",
             str(tiny_models["llama-lm"]["mg"]), "--pairs", str(pairs), "--demonstrations", str(demonstrations),
             "--out", str(root / "results.json"))
    return read_json(root / "results.json")


def _close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("layout", ("dp2", "pp2"))
def test_a_budget_below_a_fixed_micro_batch_gives_the_same_step(results, layout, stage):
    case = results[layout][stage]
    fixed = results["pp2"]["sft"]["fixed"] if (layout, stage) == ("dp2", "sft") else case["fixed"]
    assert case["budget_tokens"] < case["fixed_tokens"]
    assert case["largest_micro_batch"] <= case["budget_tokens"]
    assert len(case["widths"]) > 1  # micro-batches padded to their own longest rows
    assert case["micro_batches"] == case["max_micro_batches"] >= 2  # the same count on every rank
    assert case["budget"]["update_skipped"] == 0.0
    for name in STAGES[stage]:
        assert _close(case["budget"][name], fixed[name]), name
    if (layout, stage) != ("dp2", "sft"):  # there the fixed step's loss is a mean of the ranks' token means
        assert case["param_rel_diff"] < 1e-6


def test_without_the_loss_scales_the_step_differs(results):
    """Megatron's plain mean over micro-batches of different sizes is not the mean over pairs."""
    case = results["dp2"]["stage1_unscaled"]
    assert len(set(case["rows"])) > 1  # micro-batches of different numbers of pairs
    assert not _close(case["budget"]["loss"], case["fixed"]["loss"])
    assert case["param_rel_diff"] > 1e-4
