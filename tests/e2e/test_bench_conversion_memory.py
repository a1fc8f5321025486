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
                             "--layouts", "1x2", "--export-ranks", "2", "--json", str(out)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    imported, exported = json.loads(out.read_text())
    assert (imported["direction"], imported["layout"]) == ("import", "TP1xPP2")
    assert (exported["direction"], exported["layout"], exported["exact"]) == ("export", "2 processes", True)
    # 2 layers of hidden 64, FFN 176, 16 heads of 4 with 4 KV groups, the 128-row vocabulary, untied, fp32.
    layer = 64 * (64 + 2 * 16) + 64 * 64 + 3 * 64 * 176 + 2 * 64
    assert imported["layer_bytes"] == 4 * layer
    assert imported["model_bytes"] == 4 * (2 * layer + 2 * 128 * 64 + 64)
    assert imported["peak_bytes"] > 0 and exported["peak_bytes"] > 0
    assert "peak/model" in result.stdout
