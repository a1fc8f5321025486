"""Test helpers: torchrun launches of worker scripts and fixed inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
WORKERS = REPO / "tests" / "distributed" / "workers"
# First on the path of the processes the suite starts: its sitecustomize hides Transformer Engine and Apex.
GLOO_ENV = REPO / "tests" / "gloo_env"
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
# (TP, PP, EP, expert TP) of the MoE tests, on 4 processes.
MOE_LAYOUTS = {"tp1": (1, 1, 1, 1), "ep2": (1, 1, 2, 1), "tp2ep2": (2, 1, 2, 1), "tp2etp2": (2, 1, 1, 2),
               "tp2ep2etp2": (2, 1, 2, 2), "pp2": (1, 2, 1, 1), "pp2ep2": (1, 2, 2, 1)}


def cpu_process_env(*python_path: str) -> dict[str, str]:
    """The environment of a child process that runs as on a CPU machine wherever the suite runs: CUDA, Transformer
    Engine and Apex hidden (on a GPU machine the gloo tier would otherwise meet NCCL's one-GPU-per-rank rule and TE's
    CUDA-only optimizer), one thread per process; ``python_path`` goes after the hiding packages."""
    path = [str(GLOO_ENV), *python_path, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join(path)}


TE_FIXTURES = frozenset({"te", "tiny_moe_models"})
"""Fixtures that need Transformer Engine on a GPU: ``te`` itself, and the tiny MoE models (megatron-core 0.16.1's
MoE router fails on a GPU without TE, so their conversion would). A test that takes one, directly or through another
fixture, is skipped at collection where TE is missing, before any fixture converts anything."""


def tier_skip_reason(markers: set[str], fixtures: set[str], cuda: bool, te_missing: str | None,
                     vllm_missing: str | None, slurm_missing: str | None = None) -> str | None:
    """Why a test with these markers and this fixture closure cannot run here (None: it can): ``gpu`` without CUDA,
    ``vllm`` where vLLM is missing, ``slurm`` without a running Slurm cluster, and on a GPU a TE fixture where
    Transformer Engine is (``te_missing``, the reason from megatron_save.models.spec.transformer_engine_missing)."""
    if "gpu" in markers and not cuda:
        return "needs a CUDA GPU (the GPU tier)"
    if "vllm" in markers and vllm_missing:
        return vllm_missing
    if "slurm" in markers and slurm_missing:
        return slurm_missing
    if cuda and te_missing and fixtures & TE_FIXTURES:
        return f"needs Transformer Engine ({', '.join(sorted(fixtures & TE_FIXTURES))}): {te_missing}"
    return None


def _launch(nproc: int, target: list[str], timeout: int) -> None:
    """torchrun on gloo from the repository root (``cpu_process_env``; tests/gpu checks the GPU paths); fails with
    the launch's output on error."""
    env = cpu_process_env(str(WORKERS.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-8000:]}")


def torchrun(worker: str, nproc: int, *args: str, timeout: int = 900) -> None:
    """Runs ``tests/distributed/workers/<worker>`` under torchrun on gloo (through ``python -m workers``)."""
    if not (WORKERS / worker).exists():
        raise FileNotFoundError(WORKERS / worker)
    _launch(nproc, ["-m", "workers", Path(worker).stem, *args], timeout)


def torchrun_tool(tool: str, nproc: int, *args: str, timeout: int = 900) -> None:
    """Runs ``tools/<tool>`` under torchrun on gloo, as a user launches it."""
    if not (REPO / "tools" / tool).exists():
        raise FileNotFoundError(REPO / "tools" / tool)
    _launch(nproc, [f"tools/{tool}", *args], timeout)


STAGE3_CPU_CONFIG = REPO / "examples" / "cpu" / "stage3_save.yaml"


def run_stage3(nproc: int, output_dir: Path, policy: Path, reward: Path, prompts: Path, *overrides: str,
               timeout: int = 900) -> None:
    """Launches stage 3 with examples/cpu/stage3_save.yaml under torchrun, as a user would."""
    _launch(nproc, ["-m", "megatron_save", "stage3", str(STAGE3_CPU_CONFIG),
                    *stage3_overrides(output_dir, policy, reward, prompts, *overrides)], timeout)


def run_stage3_in_process(output_dir: Path, policy: Path, reward: Path, prompts: Path, *overrides: str) -> Path:
    """run_stage3 in this process, as a world of one (the caller sets TP = PP = 1): the same config and code,
    without a launch's start-up."""
    from megatron_save.config import load_config
    from megatron_save.trainers.stage3 import Stage3Config, train_stage3

    return train_stage3(load_config(Stage3Config, STAGE3_CPU_CONFIG,
                                    stage3_overrides(output_dir, policy, reward, prompts, *overrides)))


def stage3_overrides(output_dir: Path, policy: Path, reward: Path, prompts: Path, *overrides: str) -> list[str]:
    """The key=value overrides of examples/cpu/stage3_save.yaml naming a run's directory, models and prompts."""
    return [f"output_dir={output_dir}", f"policy.checkpoint={policy}", f"reward.checkpoint={reward}",
            f"train_data={prompts}", *overrides]


def read_metrics(output_dir: Path) -> list[dict]:
    """The records of a stage-3 run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def token_batch(batch: int = 4, seq: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token ids [B, S] (ids 3..99, pad 0) of lengths seq, seq-3, ... and their mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 100, (batch, seq), generator=generator)
    lengths = torch.tensor([max(2, seq - 3 * i) for i in range(batch)])
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return input_ids.masked_fill(~mask, 0), mask


def prompt_lengths_of(mask: torch.Tensor) -> torch.Tensor:
    """A prompt length for each row of a token_batch: about half of its real tokens. [B, S] -> [B]."""
    return (mask.sum(dim=1) // 2).clamp(min=1)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def length_parity_grade(prompt: str, response: str) -> float:
    """A stand-in verifier for stage 3's tests (reward.verifier=helpers:length_parity_grade): 1 for a response
    of even length, else 0 (mixed labels within a group, which PRIME's accuracy filter keeps)."""
    return float(len(response) % 2 == 0)


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory, its value-head side file included."""
    from megatron_save.checkpoint.hf import VALUE_HEAD_FILE
    from megatron_save.checkpoint.safetensors_io import SafetensorsReader

    model_dir = Path(model_dir)
    side = (VALUE_HEAD_FILE,) if (model_dir / VALUE_HEAD_FILE).exists() else ()
    reader = SafetensorsReader(model_dir, side_files=side)
    return {name: reader.get(name) for name in sorted(reader.names())}


def slurm_missing() -> str | None:
    """Why Slurm tests cannot run here (None when they can): sbatch absent, or no cluster answering sinfo with an
    idle or mixed node (.ci/slurm_leg.sh starts one on this machine)."""
    import shutil

    if shutil.which("sbatch") is None:
        return "needs Slurm: sbatch is not on PATH (.ci/slurm_leg.sh installs slurm-wlm and starts a cluster)"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"needs a running Slurm cluster: sinfo failed ({error})"
    states = result.stdout.split()
    if result.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return (f"needs a running Slurm cluster (.ci/slurm_leg.sh starts one): sinfo said "
                f"{(result.stderr or result.stdout).strip()[:200]!r}")
    return None
