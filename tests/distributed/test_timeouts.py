"""parallel.timeout_minutes holds for Megatron's process groups too: a stopped rank ends the job after the timeout
instead of Megatron's default 30 minutes.

No bound here depends on the machine's speed where it need not: start-up runs under the default timeout (see the
worker), and the upper bounds only tell the 6 s timeout from the 30-minute default, leaving a machine 50 times
slower room. The launch's own limit is a hang guard (a stopped rank that torchrun did not end would hang forever)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO, WORKERS

DEFAULT_TIMEOUT_S = 30 * 60  # Megatron's and torch's default collective timeout


def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path):
    out = tmp_path / "timeout.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(WORKERS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # Returning at all shows that torchrun ended the stopped rank too. The limit, a hang guard, is ten times a
    # start-up on a loaded machine and half the default timeout, so a group without the setting still fails here.
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "workers", "timeout_worker", "--out", str(out)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=DEFAULT_TIMEOUT_S // 2)
    assert result.returncode != 0
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["error"] is not None and "timed out" in report["error"].lower(), report
    # A timeout never fires early; the upper bound separates 6 s from the 30-minute default.
    assert 0.9 * report["timeout_s"] <= report["waited_s"] <= DEFAULT_TIMEOUT_S / 6, report
