"""The testbed report: intervals against hand-computed values, and the table and plots from run directories
written here by hand."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from megatron_save.testbed.report import mean_interval, t95, write_report


def test_mean_interval_hand_computed():
    stat = mean_interval([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["n"] == 3
    assert stat["ci95"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # std 1, t(2 df) = 4.303
    assert mean_interval([0.5]) == {"mean": 0.5, "ci95": None, "n": 1}
    assert mean_interval([float("nan"), 1.0, 3.0])["mean"] == 2.0  # NaN left out
    assert mean_interval([])["mean"] is None
    assert t95(2) == 12.706 and t95(12) == 2.228  # 11 degrees of freedom: the 10-df quantile (wider, safe side)
    assert t95(100) == 1.96


def _write_run(run_dir, responses_by_step, keep_rates, final_gold, accuracy=0.7):
    run_dir.mkdir(parents=True)
    rows = [{"step": step, "prompt": [{"role": "user", "content": "abc: write 4 vowels"}], "responses": responses,
             "rewards": [0.0] * len(responses), "value": 0.0, "valid": [True] * len(responses),
             "kept": [True] * len(responses)} for step, responses in responses_by_step.items()]
    (run_dir / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [{"step": step, "filter/keep_rate": rate, "filter/reward_mean": 0.1 * step}
               for step, rate in zip(responses_by_step, keep_rates)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / "gold_eval.json").write_text(json.dumps({
        "final_policy_gold": final_gold, "final_policy_letters": 4.0, "rm_accuracy_initial_policy_pairs": 0.8,
        "rm_accuracy_final_policy_pairs": accuracy, "proxy_accuracy_final_policy_pairs": 0.6,
        "proxy_accuracy_initial_policy_pairs": 0.8,
        "proxy_reward_by_step": {str(step): float(step) for step in responses_by_step}}))


def test_report_from_run_directories(tmp_path):
    # Gold of "ab" is 1/4 and of "aeio" is 1 (L = 4); seed 1 improves faster than seed 0.
    steps = {0: {1: ["ab", "ab"], 2: ["ab", "aeio"], 3: ["aeio", "aeio"]},
             1: {1: ["ab", "ab"], 2: ["aeio", "aeio"], 3: ["aeio", "aeio"]}}
    for seed in (0, 1):
        (tmp_path / f"seed_{seed}" / "data").mkdir(parents=True)
        (tmp_path / f"seed_{seed}" / "data" / "initial_policy.json").write_text(json.dumps({"gold": 0.5,
                                                                                             "rm_pairs": 100}))
        for run in ("frozen", "save"):
            _write_run(tmp_path / f"seed_{seed}" / "runs" / run, steps[seed], [1.0, 0.5, 0.0],
                       final_gold=0.4 + 0.2 * seed + (0.1 * (seed + 1) if run == "save" else 0.0),
                       accuracy=0.7 + (0.05 if run == "save" else 0.0))
    report = write_report(tmp_path, [0, 1], ["frozen", "save"], tmp_path / "report", {"note": "test"},
                          [("save", "frozen")], margin=0.02)
    results = json.loads((report / "results.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert results["provenance"]["revision"] == head and isinstance(results["provenance"]["dirty"], bool)
    assert results["run_revisions"] == [{"revision": "not recorded", "dirty": True}]  # hand-made runs carry none
    compared = results["comparisons"]["save - frozen"]
    assert compared["final_policy_gold"]["mean"] == pytest.approx(0.15)  # two seeds: t(1 df) = 12.7, undecided
    assert compared["final_policy_gold"]["verdict"] == "undecided"
    # RM gain = accuracy on the final pairs minus the proxy's: save 0.75 - 0.6, frozen 0.7 - 0.6, both seeds.
    assert compared["rm_gain_final_policy_pairs"]["mean"] == pytest.approx(0.05)
    assert compared["rm_gain_final_policy_pairs"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert compared["rm_gain_final_policy_pairs"]["verdict"] == "higher"
    assert compared["rm_accuracy_initial_policy_pairs"]["verdict"] == "no difference"  # both 0.8: interval [0, 0]
    frozen = results["table"]["frozen"]
    # save's final gold is frozen's + 0.1 (seed 0) and + 0.2 (seed 1): paired mean 0.15, t(1 df) x 0.0707 / sqrt 2.
    paired = results["paired_with_frozen"]["save"]
    assert paired["final_policy_gold_vs_frozen"]["mean"] == pytest.approx(0.15)
    assert paired["final_policy_gold_vs_frozen"]["ci95"] == pytest.approx(12.706 * 0.0707107 / math.sqrt(2), rel=1e-5)
    assert paired["rm_accuracy_final_policy_pairs_vs_proxy"]["mean"] == pytest.approx(0.75 - 0.6)
    assert paired["gold_last5_vs_frozen"]["mean"] == pytest.approx(0.0)
    assert "frozen" not in results["paired_with_frozen"]
    assert frozen["final_policy_gold"]["mean"] == pytest.approx(0.5)
    assert frozen["final_policy_gold"]["ci95"] == pytest.approx(12.706 * 0.1414213 / math.sqrt(2), rel=1e-5)
    # Gold of the last (up to 5) steps: seed 0 (0.25 + 0.625 + 1) / 3, seed 1 (0.25 + 1 + 1) / 3.
    assert frozen["gold_last5"]["mean"] == pytest.approx((1.875 / 3 + 2.25 / 3) / 2)
    assert frozen["gold_gain"]["mean"] == pytest.approx((1.875 / 3 + 2.25 / 3) / 2 - 0.25)
    assert frozen["keep_rate"]["mean"] == pytest.approx(0.5)
    assert results["curves"]["save"][1]["gold"] == {"1": 0.25, "2": 1.0, "3": 1.0}
    assert results["curves"]["save"][0]["letters"]["2"] == 3.0
    assert results["initial"]["proxy_accuracy"]["mean"] == 0.8
    table = (report / "results.md").read_text()
    assert "| frozen | 0.500 ± " in table and "| save |" in table
    assert "| save - frozen | 0.150 ± " in table and "(higher)" in table
    for plot in ("gold_by_step", "overoptimisation", "keep_rate", "letters_by_step"):
        assert (report / f"{plot}.png").stat().st_size > 1000


def test_moving_average_hand_computed():
    from megatron_save.testbed.report import moving_average

    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])
    assert moving_average([1.0, 5.0], 1) == [1.0, 5.0]


def test_verdicts_hand_computed():
    from megatron_save.testbed.report import verdict

    assert verdict({"mean": 0.1, "ci95": 0.05}, 0.02) == "higher"
    assert verdict({"mean": -0.1, "ci95": 0.05}, 0.02) == "lower"
    assert verdict({"mean": 0.0, "ci95": 0.015}, 0.02) == "no difference"
    assert verdict({"mean": 0.0, "ci95": 0.03}, 0.02) == "undecided"  # crosses 0 and leaves the margin
    assert verdict({"mean": 0.02, "ci95": 0.019}, 0.02) == "higher"  # above 0 wins over the margin
    assert verdict({"mean": 0.5, "ci95": None}, 0.02) == "undecided"  # one seed: no interval


def test_within_group_agreement_hand_computed():
    from megatron_save.testbed.gold_eval import within_group_agreement

    # gold orders (0 > 1), (0 > 2), (2 > 1); 1 and 3 tie in gold and are left out; 0 vs 3, 2 vs 3 ordered.
    gold = [0.9, 0.1, 0.5, 0.1]
    scores = [2.0, 1.0, 1.0, 3.0]  # right on (0,1), (0,2); tie on (1,2) -> 1/2; (0,3) wrong; (2,3) wrong
    assert within_group_agreement(gold, scores) == (2.5, 5)
    assert within_group_agreement([0.3, 0.3], [1.0, 2.0]) == (0.0, 0)


def test_current_policy_accuracy_per_step_of_the_logged_and_the_proxy_scores():
    from megatron_save.testbed.gold_eval import current_policy_accuracy

    # "abc: write 4 vowels": gold("aaaa") = 1 > gold("aab") = 2/3 * 3/4 = 0.5 > gold("zz") = 0.
    rows = [{"step": 1, "prompt": [{"role": "user", "content": "abc: write 4 vowels"}],
             "responses": ["aaaa", "aab", "zz"], "rewards": [3.0, 2.0, None], "valid": [True, True, False]},
            {"step": 2, "prompt": "abc: write 4 vowels", "responses": ["zz", "aaaa"], "rewards": [5.0, 1.0],
             "valid": [True, True]}]
    proxy = [[0.0, 1.0, 9.0], [0.0, 1.0]]  # one per logged response (the invalid one is not paired)
    assert current_policy_accuracy(rows, proxy) == {"rm": {1: 1.0, 2: 0.0}, "proxy": {1: 0.0, 2: 1.0}}


def test_dose_response_readings_follow_the_preregistered_rules():
    from megatron_save.testbed.report import dose_response, dose_response_readings

    def seeds(*values):
        return [{"final_policy_gold": v, "rm_gain_final_policy_pairs": v, "rm_accuracy_initial_policy_pairs": v,
                 "gold_last5": v, "probe_drift_last5": v, "current_policy_gain_last5": v} for v in values]

    per_seed = {"frozen": seeds(0, 0, 0), "online_gold@0.001": seeds(0.10, 0.12, 0.11),
                "online_gold@1e-05": seeds(0.01, -0.01, 0.0), "save@0.001": seeds(-0.10, -0.12, -0.11),
                "save@1e-05": seeds(0.3, -0.3, 0.0)}
    sweep = {"online_gold": {1e-3: "online_gold@0.001", 1e-5: "online_gold@1e-05"},
             "save": {1e-3: "save@0.001", 1e-5: "save@1e-05"}}
    dose = dose_response(per_seed, sweep, margin=0.02)
    assert dose["online_gold"]["0.001"]["rm_gain_final_policy_pairs"]["verdict"] == "higher"
    assert dose["save"]["0.001"]["final_policy_gold"]["verdict"] == "lower"
    assert dose["save"]["1e-05"]["final_policy_gold"]["verdict"] == "undecided"
    readings = dose_response_readings(dose)
    assert "passes at RM LR 0.001:" in readings[0]
    assert readings[-2].endswith("at RM LR 0.001.") and readings[-1].endswith("at RM LR 0.001.")  # SAVE drifts
    per_seed["online_gold@0.001"] = seeds(0.0, 0.01, -0.01)
    readings = dose_response_readings(dose_response(per_seed, sweep, margin=0.02))
    assert "the testbed cannot see the effect SAVE claims" in readings[0]


def _summaries(*values, proxy=0.7):
    return [{"final_policy_gold": v, "rm_gain_final_policy_pairs": v, "rm_accuracy_initial_policy_pairs": v,
             "gold_last5": v, "probe_drift_last5": v, "current_policy_gain_last5": v,
             "proxy_accuracy_final_policy_pairs": p} for v, p in zip(values, proxy if isinstance(proxy, list)
                                                                  else [proxy] * len(values))]


def test_rule_b_gates_self_labelled_verdicts_on_the_control():
    from megatron_save.testbed.report import compare_runs, comparison_readings

    per_seed = {"frozen": _summaries(0, 0, 0), "online_gold": _summaries(0.0, 0.01, -0.01),
                "save": _summaries(-0.10, -0.12, -0.11), "oracle": _summaries(0.30, 0.32, 0.31)}
    comparisons = [("online_gold", "frozen"), ("save", "frozen"), ("save", "online_gold"), ("oracle", "frozen")]
    readings = comparison_readings(compare_runs(per_seed, comparisons, margin=0.02))
    assert readings[1].startswith("- `save - frozen`: final_policy_gold lower")  # the verdict is shown ...
    assert readings[1].endswith("(not counted: the positive control does not pass).")  # ... and not counted
    assert readings[2].endswith("(not counted: the positive control does not pass).")
    assert readings[3].startswith("- `oracle - frozen`: final_policy_gold higher") and "not counted" not in readings[3]
    per_seed["online_gold"] = _summaries(0.10, 0.12, 0.11)  # the control passes: SAVE's verdicts count
    readings = comparison_readings(compare_runs(per_seed, comparisons, margin=0.02))
    assert not any("not counted" in line for line in readings)


def test_strata_split_seeds_by_the_frozen_runs_proxy_accuracy():
    from megatron_save.testbed.report import stratified_comparisons, strata

    per_seed = {"frozen": _summaries(0, 0, 0, 0, proxy=[0.3, 0.8, 0.45, 0.7]),
                "save": _summaries(0.2, 0.0, 0.22, 0.01)}
    groups = strata(per_seed, [10, 11, 12, 13], threshold=0.5)
    assert groups == {"games the proxy": [0, 2], "others": [1, 3]}
    stratified = stratified_comparisons(per_seed, [("save", "frozen")], groups, margin=0.02)
    assert stratified["games the proxy"]["save - frozen"]["final_policy_gold"]["mean"] == pytest.approx(0.21)
    assert stratified["others"]["save - frozen"]["final_policy_gold"]["mean"] == pytest.approx(0.005)


def test_dose_response_readings_gate_self_labelled_runs():
    from megatron_save.testbed.report import dose_response, dose_response_readings

    per_seed = {"frozen": _summaries(0, 0, 0), "online_gold@0.001": _summaries(0.10, 0.12, 0.11),
                "online_gold@1e-05": _summaries(0.01, -0.01, 0.0), "save@0.001": _summaries(-0.10, -0.12, -0.11),
                "save@1e-05": _summaries(-0.10, -0.12, -0.11)}
    sweep = {"online_gold": {1e-3: "online_gold@0.001", 1e-5: "online_gold@1e-05"},
             "save": {1e-3: "save@0.001", 1e-5: "save@1e-05"}}
    save_line = next(line for line in dose_response_readings(dose_response(per_seed, sweep, margin=0.02))
                     if line.startswith("- `save - frozen`"))
    assert "0.001: gold lower, rm_gain lower;" in save_line  # the control passes at 1e-3: counted
    assert "1e-05: gold lower, rm_gain lower (not counted: the control does not pass)" in save_line
