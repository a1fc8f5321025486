"""Fault injection: a tiny stage-3 run at TP=2 killed with SIGKILL (every process of the launch: torchrun and
its ranks, which run in sessions of their own) after its first checkpoint, inside a checkpoint write and inside
the final models' write, relaunched each time, ends with exactly the parameters and metrics of an uninterrupted
run; and a second launch into a running run's directory is refused at once. The two kills inside a write wait for
rank 0 to stop at the start of the publication (everything written, not yet renamed), which a test entry point
arranges: a write of a tiny model lasts milliseconds, too short to catch by polling on a loaded CI machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import REPO, STAGE3_CPU_CONFIG, WORKERS, read_metrics, run_stage3, stage3_overrides

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.utils.files import LOCK_FILE


def _launch(*overrides: str, pause_in: tuple[str, Path] | None = None) -> subprocess.Popen:
    """Stage 3 at TP=2 in the background; with ``pause_in=(PATTERN, MARKER)`` its rank 0 writes MARKER and waits
    when it starts publishing a directory named like PATTERN (tests/distributed/workers/stage3_paused_publish.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(WORKERS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    entry = ["-m", "megatron_save", "stage3"] if pause_in is None else \
        ["-m", "workers", "stage3_paused_publish", pause_in[0], str(pause_in[1])]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             *entry, str(STAGE3_CPU_CONFIG), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (the ranks leave torchrun's process group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal(pids: list[int], number: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


def _kill_when(process: subprocess.Popen, ready, timeout: float = 600) -> None:
    """SIGKILL to the launch and all its processes as soon as ``ready()``; fails if the run ends first.

    The processes are listed while waiting (a /proc scan takes milliseconds, on a loaded machine more than a small
    write does), so the ranks are stopped the moment ``ready()`` holds; with the tree frozen and intact, a second
    scan then finds any later child, and everything is killed."""
    deadline = time.monotonic() + timeout
    known, scanned = [], 0.0
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        if time.monotonic() - scanned > 0.2:
            known, scanned = _descendants(process.pid), time.monotonic()
        time.sleep(0.005)
    _signal(known, signal.SIGSTOP)
    _signal([*_descendants(process.pid), *known, process.pid], signal.SIGKILL)
    process.wait()


def _parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in build_model_from_checkpoint(checkpoint)[0].named_parameters()}


def test_killed_and_relaunched_run_ends_as_the_uninterrupted_one(tiny_models, rl_data, tmp_path, world_of_one):
    models = (tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"])
    settings = ("total_steps=4", "save_every=1", "keep_checkpoints=2", "rollout_log=true", "tensorboard=false")
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    run_stage3(2, straight, *models, *settings)
    overrides = stage3_overrides(faulty, *models, *settings)
    checkpoints = faulty / "checkpoints"

    first = _launch(*overrides)
    _kill_when(first, lambda: (checkpoints / "latest").exists())  # step 1 checkpointed, step 2 under way
    assert not (faulty / "policy").exists()

    in_checkpoint_write, in_final_write = tmp_path / "in_checkpoint_write", tmp_path / "in_final_write"
    second = _launch(*overrides, pause_in=("step_*.tmp", in_checkpoint_write))
    lock = faulty / LOCK_FILE

    def second_holds_the_lock() -> bool:  # it took over the dead first launch's lock
        try:
            return json.loads(lock.read_text())["pid"] in _descendants(second.pid)
        except (OSError, ValueError, KeyError):
            return False

    deadline = time.monotonic() + 300
    while not second_holds_the_lock():
        assert second.poll() is None and time.monotonic() < deadline, "the relaunch never took the lock"
        time.sleep(0.05)
    # While it runs, another launch into the same directory stops at once, naming the holder.
    refused = subprocess.run([sys.executable, "-m", "megatron_save", "stage3", str(STAGE3_CPU_CONFIG), *overrides],
                             cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert refused.returncode != 0 and "is in use by another launch" in refused.stderr, refused.stderr[-2000:]
    _kill_when(second, in_checkpoint_write.exists)  # inside a checkpoint write: all written, not yet renamed
    assert any(checkpoints.glob("step_*.tmp"))

    third = _launch(*overrides, pause_in=("policy.tmp", in_final_write))
    _kill_when(third, in_final_write.exists)  # inside the final models' write
    assert (faulty / "policy.tmp").is_dir() and not (faulty / "policy").exists()

    run_stage3(2, faulty, *models, *settings)  # the last relaunch runs to the end
    assert not any(faulty.glob("*.tmp")) and not any(checkpoints.glob("*.tmp"))
    for model in ("policy", "reward_model"):
        expected, actual = _parameters(straight / model), _parameters(faulty / model)
        for name, value in expected.items():
            assert torch.equal(value, actual[name]), f"{model}: {name} differs after the faults"
    timing = ("time/", "throughput/", "memory/")
    records = [{k: v for k, v in r.items() if not k.startswith(timing)} for r in read_metrics(faulty)]
    assert records == [{k: v for k, v in r.items() if not k.startswith(timing)} for r in read_metrics(straight)]
    assert (faulty / "rollouts.jsonl").read_text() == (straight / "rollouts.jsonl").read_text()
