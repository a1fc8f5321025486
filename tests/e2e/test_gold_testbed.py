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


def test_the_dose_response_config_passes_its_check():
    from megatron_save.testbed.pipeline import run_table

    cfg = load_config(TestbedConfig, [EXAMPLES / "gold_testbed.yaml", EXAMPLES / "dose_response.yaml"])
    check_testbed_config(cfg)
    table = run_table(cfg)
    assert cfg.seeds == list(range(5)) and cfg.overlong_pair_share == 0.0 and len(table) == 13
    assert table["save@0.0001"][-2:] == ["reward.optim.lr=0.0001", "reward.optim.value_head_lr=0.05"]
    assert table["online_gold@1e-06"][0] == "reward.strategy=verifier_hl_bt"


def test_the_large_lr_config_passes_its_check():
    from megatron_save.testbed.pipeline import run_table

    cfg = load_config(TestbedConfig, [EXAMPLES / "gold_testbed.yaml", EXAMPLES / "large_lr.yaml"])
    check_testbed_config(cfg)
    table = run_table(cfg)
    assert cfg.seeds == list(range(100, 120)) and cfg.overlong_pair_share == 0.0
    assert list(table) == ["frozen", "online_gold", "save", "oracle"]
    assert table["oracle"][0] == "reward.strategy=verifier_reward" and cfg.strata_proxy_accuracy == 0.5
    assert cfg.stage3_overrides == ["reward.optim.lr=1e-3", "reward.optim.value_head_lr=0.5"]


def _config(out, *extra):
    return load_config(TestbedConfig, [EXAMPLES / "gold_testbed.yaml"], [f"output_dir={out}", *SHORT, *extra])


def test_gold_testbed_short_run(tmp_path):
    """Through tools/gold_testbed.py, README's first command, shortened."""
    out = tmp_path / "testbed"
    # Regime two's path (a share of the proxy's pairs padded past L) and a pre-registered comparison, shortened.
    # The positive control swept at one RM learning rate: the dose-response report's path.
    extra = ["overlong_pair_share=0.25", "comparisons=[[save,frozen]]", "swept_runs=[online_gold]",
             "rm_learning_rates=[1e-3]"]
    result = subprocess.run([sys.executable, "tools/gold_testbed.py", f"output_dir={out}", *SHORT, *extra], cwd=REPO,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = out / "report"
    assert f"table: {report / 'results.md'} (and results.json)" in result.stdout
    assert result.stdout.startswith((report / "results.md").read_text())
    results = json.loads((report / "results.json").read_text())
    assert set(results["table"]) == {"frozen", "save", "online_gold@0.001"}
    # Every evaluation of this launch recorded the revision the report names.
    assert results["run_revisions"] == [{k: results["provenance"][k] for k in ("revision", "dirty")}]
    for run, stats in results["table"].items():
        for column in ("final_policy_gold", "rm_accuracy_initial_policy_pairs", "gold_last5", "keep_rate"):
            assert 0.0 <= stats[column]["mean"] <= 1.0, (run, column)
        curves = results["curves"][run][0]
        assert list(curves["gold"]) == list(curves["proxy_reward"]) == ["1", "2", "3"]
        assert all(math.isfinite(v) for v in curves["proxy_reward"].values())
        # Drift: the RM measured before each step's update on the fixed pairs, and on each step's own pairs.
        assert list(curves["probe_accuracy"]) == ["1", "2", "3"]
        assert all(0 <= v <= 1 for v in curves["probe_accuracy"].values())
        assert all(-1 <= v <= 1 for v in curves["current_policy_gain"].values())
    # Before any update every run's RM is the proxy: the same probe accuracy at step 1; frozen's never moves.
    probes = {run: results["curves"][run][0]["probe_accuracy"] for run in results["table"]}
    assert len({p["1"] for p in probes.values()}) == 1 and len(set(probes["frozen"].values())) == 1
    assert results["per_seed"]["frozen"][0]["probe_drift_last5"] == 0.0
    assert results["per_seed"]["frozen"][0]["current_policy_gain_last5"] == pytest.approx(0.0, abs=1e-6)
    dose = results["dose_response"]["online_gold"]["0.001"]
    assert set(dose) == set(results["comparisons"]["save - frozen"]) and dose["final_policy_gold"]["n"] == 1
    assert any("Positive control" in line for line in results["dose_response_readings"])
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
                             "gold_last5", "probe_drift_last5", "current_policy_gain_last5"}
    assert compared["final_policy_gold"]["n"] == 1 and compared["final_policy_gold"]["verdict"] == "undecided"
    assert "| save |" in (report / "results.md").read_text()
    assert sorted(p.name for p in report.glob("*.png")) == ["dose_response.png", "drift.png", "gold_by_step.png",
                                                            "keep_rate.png", "letters_by_step.png",
                                                            "overoptimisation.png"]
    assert "Dose-response" in (report / "results.md").read_text()
    wall = results["settings"]["wall_time"]  # every step of this fresh launch timed
    assert wall["steps"] == wall["steps_timed"] == 11 and 0 < wall["seconds_timed_rl_runs"] < wall["seconds_timed"]
    assert "Wall time:" in (report / "results.md").read_text()

    # A relaunch runs nothing again: every step is marked done and the report is rewritten from the same files.
    before = (runs / "save" / "gold_eval.json").stat().st_mtime_ns
    run_testbed(_config(out, *extra))
    assert (runs / "save" / "gold_eval.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="other settings"):
        run_testbed(_config(out))  # regime one's pairs differ: not the same steps
