"""tools/bench_rollout.py runs end to end (one round, a one-layer random model, two backends) and reports every
metric with its ratio to vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.vllm


def test_bench_rollout_reports_ratios_to_vllm(tmp_path):
    command = [sys.executable, "tools/bench_rollout.py", "--model", "random-1024", "--layers", "1", "--rounds", "1",
               "--prompts", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--backends", "vllm", "transformers",
               "--out", str(tmp_path / "report.txt"), "--json", str(tmp_path / "runs.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    report = (tmp_path / "report.txt").read_text()
    assert report.startswith("command: ") and "cpu_model: " in report and "revision: " in report
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    for backend in ("vllm", "transformers"):
        (run,) = runs[backend]
        assert run["tokens"] == 2 * 4 and run["tokens_per_s"] > 0 and run["ttft_s"] > 0
        assert run["peak_rss_gib"] > 0 and run["update_s"] > 0
    assert report.count("x1.00") == 4  # vLLM's own ratio, one per metric
