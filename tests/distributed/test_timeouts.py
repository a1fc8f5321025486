"""parallel.timeout_minutes holds for Megatron's process groups too: a stopped rank ends the job within the
timeout plus a margin instead of Megatron's default 30 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from helpers import REPO, WORKERS


def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path):
    out = tmp_path / "timeout.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(WORKERS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "workers", "timeout_worker", "--out", str(out)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - start
    assert result.returncode != 0
    report = json.loads(out.read_text())
    assert report["error"] is not None and "timed out" in report["error"].lower(), report
    assert 5.0 <= report["waited_s"] <= 30.0, report  # 0.1 minutes, not 30
    assert wall < 120, wall  # torchrun ended the stopped rank too
