"""tools/bench_conversion_memory.py runs, converts both ways exactly and reports each rank's peak against the
model's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO


def test_benchmark_reports_peaks_of_an_exact_round_trip(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "tools/bench_conversion_memory.py", "--layers", "2", "--hidden", "64",
                             "--layouts", "1x2", "--json", str(out)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = json.loads(out.read_text())
    assert (row["layers"], row["tp"], row["pp"], row["exact"]) == (2, 1, 2, True)
    # 2 layers of hidden 64, FFN 176, 16 heads of 4 with 4 KV groups, the 128-row vocabulary, untied, fp32.
    layer = 64 * (64 + 2 * 16) + 64 * 64 + 3 * 64 * 176 + 2 * 64
    assert row["layer_bytes"] == 4 * layer
    assert row["model_bytes"] == 4 * (2 * layer + 2 * 128 * 64 + 64)
    assert row["import_peak_bytes"] > 0 and row["export_peak_bytes"] > 0
    assert "import/model" in result.stdout
