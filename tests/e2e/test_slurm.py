"""Under real Slurm (.ci/slurm_leg.sh starts a one-node cluster on localhost; skipped without one):
examples/slurm/stage3_save.sbatch as two tasks on the one node, each task a torchrun "node" joining one c10d
rendezvous; and a two-rung tiny scaling study with launcher: slurm, its jobs chained with --dependency=afterok,
both through sbatch --wait to the end."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, cpu_process_env
from megatron_save.testing import save_tiny_hf_model
from test_scaling_study import study_tool, tiny_study

pytestmark = pytest.mark.slurm


def test_stage3_example_two_tasks_one_rendezvous(tmp_path, rl_data):
    """Two Slurm tasks, one torchrun each (1 process), rendezvous on the first node: world 2, the CPU config's TP=2
    split across the two torchrun "nodes"."""
    from megatron_save.distributed.init import free_port

    models = {}
    for role, reward_model in (("policy", False), ("reward", True)):
        hf = save_tiny_hf_model("llama", tmp_path / f"{role}_hf", reward_model=reward_model, seed=7,
                                value_head=reward_model)
        subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out",
                        str(tmp_path / role)], cwd=REPO, env=cpu_process_env(), check=True, capture_output=True)
        models[role] = tmp_path / role
    out = tmp_path / "rl"
    log = tmp_path / "job.out"
    env = {**cpu_process_env(), "GPUS_PER_NODE": "1", "RDZV_PORT": str(free_port())}
    command = ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
               "--time=60", f"--output={log}", "examples/slurm/stage3_save.sbatch", "examples/cpu/stage3_save.yaml",
               f"output_dir={out}", f"train_data={rl_data['prompts']}",
               f"policy.checkpoint={models['policy']}", f"reward.checkpoint={models['reward']}", "total_steps=1", "save_every=0",
               "tensorboard=false"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    text = log.read_text() if log.exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{text[-6000:]}"
    assert re.search(r"world 2 = TP 2 x PP 1 x DP 1", text), text[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["time/step_s"] > 0


def test_two_rung_study_through_slurm(tmp_path):
    spec = tiny_study(tmp_path, {"w32": 32, "w64": 64}, ["save"], launcher="slurm", request_gpus=False,
                      time="01:00:00")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    submitted = study_tool("run", path, "--wait").stdout
    # prepare -> rm -> cell per rung, each submitted with its parent's id as afterok dependency.
    ids = dict(re.findall(r"^(\S+): submitted as job (\d+)", submitted, re.M))
    assert sorted(ids) == sorted(f"{b}.{j}" for b in ("w32", "w64") for j in ("prepare", "rm", "save_seed1"))
    for rung in ("w32", "w64"):
        assert f"{rung}.rm: submitted as job {ids[rung + '.rm']} (after {ids[rung + '.prepare']})" in submitted
        assert f"{rung}.save_seed1: submitted as job {ids[rung + '.save_seed1']} (after {ids[rung + '.rm']})" \
            in submitted
    study_tool("collect", path)
    rows = json.loads((tmp_path / "study" / "results.json").read_text())["rows"]
    assert [(r["backbone"], r["status"]) for r in rows] == [("w32", "done"), ("w64", "done")]
    assert all(r["rm_accuracy"] is not None and r["step_time_s"] > 0 for r in rows)
    # Submitted again, the finished study submits nothing.
    again = study_tool("run", path).stdout
    assert again.count("done, skipped") == 6 and "submitted" not in again
