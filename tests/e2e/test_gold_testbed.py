"""The gold-reward testbed end to end, shortened: every step of the pipeline (task data, SFT, RM from the policy,
gold-labelled pairs, stages 1 and 2 at TP=2, stage 3 with frozen and save, evaluation, report) in child
processes, then a relaunch that finds everything done and one with other settings that is refused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from helpers import REPO

from megatron_save.config import load_config
from megatron_save.testbed.pipeline import EXAMPLES, TestbedConfig, check_testbed_config, run_testbed
from megatron_save.testbed.task import target_length

SHORT = ["sizes.demonstrations=320", "sizes.rm_prompts=96", "sizes.value_prompts=32", "sizes.rl_prompts=32",
         "sizes.eval_prompts=16", "sft_overrides=[batch.epochs=1]", "stage1_overrides=[batch.epochs=1]",
         "stage2_overrides=[batch.epochs=2]", "stage3_overrides=[total_steps=3,prompts_per_step=4]"]


def test_the_full_comparison_config_passes_its_check():
    cfg = load_config(TestbedConfig, [EXAMPLES / "gold_testbed.yaml", EXAMPLES / "full.yaml"])
    check_testbed_config(cfg)
    assert len(cfg.seeds) == 3 and "save" in cfg.runs


@pytest.mark.parametrize("regime, share", [("decisive_regime1.yaml", 0.0), ("decisive_regime2.yaml", 0.1)])
def test_the_preregistered_configs_pass_their_check(regime, share):
    cfg = load_config(TestbedConfig, [EXAMPLES / "gold_testbed.yaml", EXAMPLES / regime])
    check_testbed_config(cfg)
    assert cfg.seeds == list(range(10)) and cfg.overlong_pair_share == share
    assert ["save", "frozen"] in cfg.comparisons and ["save_lagged", "save"] in cfg.comparisons


def _config(out, *extra):
    return load_config(TestbedConfig, [EXAMPLES / "gold_testbed.yaml"], [f"output_dir={out}", *SHORT, *extra])


def test_gold_testbed_short_run(tmp_path):
    """Through tools/gold_testbed.py, README's first command, shortened."""
    out = tmp_path / "testbed"
    # Regime two's path (a share of the proxy's pairs padded past L) and a pre-registered comparison, shortened.
    extra = ["overlong_pair_share=0.25", "comparisons=[[save,frozen]]"]
    result = subprocess.run([sys.executable, "tools/gold_testbed.py", f"output_dir={out}", *SHORT, *extra], cwd=REPO,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = out / "report"
    assert f"table: {report / 'results.md'} (and results.json)" in result.stdout
    assert result.stdout.startswith((report / "results.md").read_text())
    results = json.loads((report / "results.json").read_text())
    assert set(results["table"]) == {"frozen", "save"}
    # Every evaluation of this launch recorded the revision the report names.
    assert results["run_revisions"] == [{k: results["provenance"][k] for k in ("revision", "dirty")}]
    for run, stats in results["table"].items():
        for column in ("final_policy_gold", "rm_accuracy_initial_policy_pairs", "gold_last5", "keep_rate"):
            assert 0.0 <= stats[column]["mean"] <= 1.0, (run, column)
        curves = results["curves"][run][0]
        assert list(curves["gold"]) == list(curves["proxy_reward"]) == ["1", "2", "3"]
        assert all(math.isfinite(v) for v in curves["proxy_reward"].values())
    runs = out / "seed_0" / "runs"
    # frozen trains only the policy; save trains the RM too, so its evaluation reads the run's own RM.
    assert not (runs / "frozen" / "reward_model").exists() and (runs / "save" / "reward_model").exists()
    assert results["table"]["frozen"]["keep_rate"]["mean"] == 1.0
    pairs = [json.loads(line) for line in (out / "seed_0" / "data" / "rm_pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["gold_chosen"] > p["gold_rejected"] for p in pairs)
    initial = json.loads((out / "seed_0" / "data" / "initial_policy.json").read_text())
    assert 1 <= initial["rm_pairs_overlong"] <= 24  # 24 of the 96 RM prompts, less gold ties (many: 1-epoch SFT)
    for pair in pairs[:initial["rm_pairs_overlong"]]:  # written first: a sample and itself padded past L
        short, long = sorted((pair["chosen"], pair["rejected"]), key=len)
        assert long.startswith(short) and len(long) >= target_length(pair["prompt"]) + 2
    compared = results["comparisons"]["save - frozen"]
    assert set(compared) == {"final_policy_gold", "rm_gain_final_policy_pairs", "rm_accuracy_initial_policy_pairs",
                             "gold_last5"}
    assert compared["final_policy_gold"]["n"] == 1 and compared["final_policy_gold"]["verdict"] == "undecided"
    assert "| save |" in (report / "results.md").read_text()
    assert sorted(p.name for p in report.glob("*.png")) == ["gold_by_step.png", "keep_rate.png",
                                                            "letters_by_step.png", "overoptimisation.png"]

    # A relaunch runs nothing again: every step is marked done and the report is rewritten from the same files.
    before = (runs / "save" / "gold_eval.json").stat().st_mtime_ns
    run_testbed(_config(out, *extra))
    assert (runs / "save" / "gold_eval.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="other settings"):
        run_testbed(_config(out))  # regime one's pairs differ: not the same steps
