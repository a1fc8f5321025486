"""Run metrics: rank-0 JSON lines, TensorBoard and optional Weights & Biases, and per-phase timers."""

from __future__ import annotations

import json
import math
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_save.utils.files import atomic_write_text
from megatron_save.utils.logging import get_logger

logger = get_logger("metrics")


class MetricsWriter:
    """Writes one record per step on global rank 0: ``metrics.jsonl`` always, TensorBoard and W&B when asked."""

    def __init__(self, output_dir: str | Path, tensorboard: bool, wandb_project: str | None, run_config: dict):
        self.active = dist.get_rank() == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if not self.active:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as error:
                raise ImportError(f"wandb_project={wandb_project!r} needs the wandb package: pip install wandb") \
                    from error
            self.wandb = wandb.init(project=wandb_project, config=run_config, dir=str(output_dir))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Appends ``metrics`` of ``step`` (non-finite values are written as null in the JSON lines)."""
        if not self.active:
            return
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        with self.path.open("a") as stream:
            stream.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tensorboard is not None:
            for name, value in clean.items():
                if value is not None:
                    self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def close(self) -> None:
        """Flushes and closes the sinks."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_history(path: str | Path, last_step: int) -> None:
    """Drops records after ``last_step`` from a JSON-lines history with a "step" field (metrics.jsonl,
    rollouts.jsonl): a resumed run rewrites the steps it repeats."""
    path = Path(path)
    if dist.get_rank() != 0 or not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines):  # a write cut short by a crash: the step it belonged to runs again
                logger.warning("%s: dropping its torn last line %d (%s)", path, number, error)
                continue
            raise ValueError(f"{path}, line {number}: not a JSON record with a step ({error}); fix or remove "
                             "the line to resume") from error
        if step <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def peak_host_rss_gib() -> float:
    """This process's peak resident host memory so far, GiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class PhaseTimer:
    """Wall time and (on GPU) peak allocated memory of named phases of a step."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the body; synchronises CUDA so asynchronous kernels are counted in their own phase."""
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
            self.metrics[f"memory/{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics[f"time/{name}_s"] = time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        """The step's timings, and a fresh start for the next step."""
        metrics, self.metrics = self.metrics, {}
        metrics["time/step_s"] = sum(v for k, v in metrics.items() if k.startswith("time/"))
        metrics["memory/host_peak_rss_gib"] = peak_host_rss_gib()
        return metrics
