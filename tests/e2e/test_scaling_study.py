"""tools/scaling_study.py end to end with the local launcher: three tiny widths x {frozen, save} x one seed through
stages 1-3 and the RM benchmark; the collected table holds every cell, with the values of the runs' own files.

Also the cost study's tool (tools/cost_vs_size.py) on its tiny size, one round."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, cpu_process_env

WIDTHS = {"w32": 32, "w48": 48, "w64": 64}


def study_inputs(root):
    """Synthetic stage 1-3 data and a RewardBench-format benchmark under ``root``."""
    import random

    from megatron_save.testing.paper_fixtures import _write_benchmarks
    from megatron_save.testing.synthetic import (synthetic_preference_rows, synthetic_prompts,
                                                 synthetic_response_groups, write_jsonl)

    data = {"preference_train": write_jsonl(synthetic_preference_rows(32, 0), root / "pairs.jsonl"),
            "preference_eval": write_jsonl(synthetic_preference_rows(8, 1), root / "pairs_eval.jsonl"),
            "value_data": write_jsonl(synthetic_response_groups(16, 4, 2), root / "responses.jsonl"),
            "prompts": write_jsonl(synthetic_prompts(16, 3), root / "prompts.jsonl")}
    _write_benchmarks(root / "bench", random.Random(0))
    return {key: str(path) for key, path in data.items()} | {
        "benchmark_data": str(root / "bench" / "reward-bench" / "filtered.parquet")}


def tiny_study(root, widths: dict[str, int], strategies: list[str], launcher: str = "local", **cluster) -> dict:
    """A study of tiny Llama shapes, the CPU example configs cut to a few steps."""
    return {
        "output_dir": str(root / "study"),
        "launcher": launcher,
        "backbones": [{"name": name, "shape": {"hidden_size": width, "intermediate_size": 2 * width,
                                                "num_hidden_layers": 2}} for name, width in widths.items()],
        "recipe": {
            "strategies": strategies, "seeds": [1],
            "stage1_configs": [str(REPO / "examples/cpu/stage1_bt.yaml")],
            "stage2_configs": [str(REPO / "examples/cpu/stage2_value.yaml")],
            "stage3_configs": [str(REPO / "examples/cpu/stage3_save.yaml")],
            "stage1_overrides": ["batch.global_batch_size=16", "batch.micro_batch_size=8"],
            "stage2_overrides": ["batch.epochs=1"],
            "stage3_overrides": ["total_steps=2", "save_every=0", "prompts_per_step=2", "tensorboard=false"],
            **study_inputs(root),
        },
        "cluster": {"memory_per_gpu": "4GiB", **cluster},
        "run_shape": {"dtype": "fp32", "spec": "local", "prompt_length": 64, "response_length": 12,
                      "reward_micro_batch": 4, "rollout_batch": 8},
    }


def study_tool(command: str, path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "tools/scaling_study.py", command, str(path), *args], cwd=REPO,
                            env=cpu_process_env(), capture_output=True, text=True, timeout=5400)
    if check and result.returncode != 0:
        raise AssertionError(f"scaling_study {command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def expected_row(study_dir, backbone: str, strategy: str) -> dict:
    """A cell's numbers read straight from its run's files: metrics.jsonl (steps after the first) and the
    benchmark summary (the stage-2 RM's for frozen, the trained RM's for save)."""
    cell = study_dir / backbone / f"{strategy}_seed1"
    records = [json.loads(line) for line in (cell / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = records[1:]
    rm_eval = cell / "rm_eval" if strategy == "save" else study_dir / backbone / "rm_eval"
    return {"step_time_s": statistics.fmean(r["time/step_s"] for r in measured),
            "tokens_per_s_per_gpu": statistics.fmean(r["throughput/response_tokens_per_s"] for r in measured),
            "peak_gib_measured": max(r["memory/host_peak_rss_gib"] for r in records),
            "reward": records[-1]["filter/reward_mean"], "kl": records[-1]["policy/kl_to_reference"],
            "response_length": records[-1]["rollout/response_length"],
            "rm_accuracy": json.loads((rm_eval / "rewardbench.summary.json").read_text())["score"]}


def test_local_study_of_three_widths(tmp_path):
    spec = tiny_study(tmp_path, WIDTHS, ["frozen", "save"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))

    study_tool("run", path)
    study_tool("collect", path)
    study_dir = tmp_path / "study"
    results = json.loads((study_dir / "results.json").read_text())
    rows = {(r["backbone"], r["strategy"]): r for r in results["rows"]}
    assert sorted(rows) == sorted((b, s) for b in WIDTHS for s in ("frozen", "save"))
    for (backbone, strategy), row in rows.items():
        assert row["status"] == "done", row
        expected = expected_row(study_dir, backbone, strategy)
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-12), (backbone, strategy, name)
        assert row["peak_gib_planned"] > 0 and row["layout"] == "TP1 PP1 DP1" and row["gpus"] == 1
    params = [rows[(b, "save")]["params_total"] for b in WIDTHS]
    assert params == sorted(params) and len(set(params)) == 3
    # SAVE plans more memory than GRPO: the RM's gradients and optimizer states.
    assert all(rows[(b, "save")]["peak_gib_planned"] > rows[(b, "frozen")]["peak_gib_planned"] for b in WIDTHS)
    diffs = {(d["backbone"], d["metric"]): d for d in results["comparisons"]}
    for backbone in WIDTHS:
        d = diffs[(backbone, "step_time_s")]
        assert d["mean"] == pytest.approx(rows[(backbone, "save")]["step_time_s"]
                                          - rows[(backbone, "frozen")]["step_time_s"])
        assert d["seeds"] == 1 and d["low"] is None
    table = (study_dir / "results.md").read_text()
    assert sum(line.startswith(("| w32 |", "| w48 |", "| w64 |")) for line in table.splitlines()) == 6 + 3 * 7
    assert results["provenance"]["revision"]
    assert all((study_dir / p).stat().st_size > 0 for p in results["plots"])

    # A repeated run continues the study: every job is done, nothing runs again.
    again = study_tool("run", path).stdout
    assert again.count("done, skipped") == 3 * 4 and "running" not in again

    # A cell that failed and a backbone never run stay in the table, marked.
    (study_dir / "w64" / "save_seed1" / "DONE").unlink()
    (study_dir / "w64" / "save_seed1" / "FAILED").write_text("exit status 1: stage3\n")
    extra = spec["backbones"] + [{"name": "w96", "shape": {"hidden_size": 96, "intermediate_size": 192,
                                                          "num_hidden_layers": 2}}]
    study_tool("collect", path, "backbones=" + json.dumps(extra))
    status = {(r["backbone"], r["strategy"]): r["status"] for r in
              json.loads((study_dir / "results.json").read_text())["rows"]}
    assert status[("w64", "save")].startswith("failed: exit status 1")
    assert status[("w96", "frozen")] == status[("w96", "save")] == "missing"
    assert len(status) == 8


def test_cost_vs_size_tool(tmp_path):
    """The cost study's tool on its tiny size, one round: both strategies measured, the ratio and plan written."""
    out = tmp_path / "cost"
    result = subprocess.run([sys.executable, "tools/cost_vs_size.py", "--out", str(out), "--sizes", "tiny",
                             "--lengths", "4", "--rounds", "1", "--work", str(tmp_path / "work")], cwd=REPO,
                            env=cpu_process_env(), capture_output=True, text=True, timeout=5400)
    assert result.returncode == 0, result.stderr[-4000:]
    launches = [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]
    assert sorted(e["strategy"] for e in launches) == ["frozen", "save"]
    cell = json.loads((out / "results.json").read_text())["cells"][0]
    grpo, save = (statistics.fmean(r["time/step_s"] for r in e["records"]) for e in
                  sorted(launches, key=lambda e: e["strategy"]))
    assert cell["step_time_ratio"]["median"] == pytest.approx(save / grpo)
    assert cell["planned_ratio"] > 1 and "rm_update" in "".join(cell["strategies"]["save"]["phase_s"])
    assert "| tiny |" in (out / "results.md").read_text()
    assert not any((tmp_path / "work" / "runs").iterdir())  # each run's directory goes once its records are kept


def test_cost_vs_size_names_a_bad_size(tmp_path):
    result = subprocess.run([sys.executable, "tools/cost_vs_size.py", "--out", str(tmp_path), "--sizes", "h256,h7"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "--sizes h7: choose from" in result.stderr


def test_committed_cost_study_is_what_the_docs_quote():
    """docs/scaling/cost: results.json recomputes from launches.jsonl (median of each round's SAVE / GRPO ratio of
    mean step times), and the step-time medians the scaling-studies guide lists per size are its cells'."""
    cost = REPO / "docs" / "scaling" / "cost"
    launches = [json.loads(line) for line in (cost / "launches.jsonl").read_text().splitlines()]
    cells = {(c["size"], c["length"]): c for c in json.loads((cost / "results.json").read_text())["cells"]}
    assert len(launches) == 64 and len(cells) == 8
    for (size, length), cell in cells.items():
        pairs = {}
        for entry in launches:
            if (entry["size"], entry["length"]) == (size, length):
                pairs.setdefault(entry["round"], {})[entry["strategy"]] = statistics.fmean(
                    r["time/step_s"] for r in entry["records"])
        ratios = [p["save"] / p["frozen"] for p in pairs.values()]
        assert len(ratios) == cell["rounds_paired"] == 4
        assert cell["step_time_ratio"]["median"] == pytest.approx(statistics.median(ratios))
    guide = (REPO / "docs" / "guides" / "scaling_studies.md").read_text()
    sizes = ["h256", "h384", "h576x15", "smollm2-135m"]
    for length in (32, 8):
        quoted = ", ".join(f"{cells[(size, length)]['step_time_ratio']['median']:.2f}" for size in sizes)
        assert f"at {length} response tokens: {quoted};" in guide or f"at {length} response tokens: {quoted}." in guide
