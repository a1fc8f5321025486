"""Whole-run checkpoints of stage 3: every trained model with its optimizer and schedule, RNG states, the step
and the run's counters, written atomically.

Layout under ``RUN_DIR/checkpoints``::

    step_000040/            one complete checkpoint
      <name>/               a training checkpoint (train_checkpoint.py) per trained model: policy/, reward/
      run_state.json        step, counters, layout and the run's settings
      rng/rank_00000.safetensors   Python, NumPy, torch, CUDA and Megatron model-parallel RNG states of each rank
                            (tensors and JSON metadata: nothing in a run checkpoint of ours is unpickled)
    latest                  the name of the newest complete checkpoint, written last

A checkpoint is written under ``step_N.tmp`` and renamed when every rank has finished; ``latest`` is replaced
by a rename too, so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_save.checkpoint.train_checkpoint import TRAIN_STATE_FILE, load_train_checkpoint, save_train_checkpoint
from megatron_save.models.train_state import TrainState
from megatron_save.utils.files import (
    CorruptCheckpointError,
    atomic_write_text,
    missing_manifest,
    publish_directory,
    verify_manifest,
    write_manifest,
)
from megatron_save.utils.logging import get_logger

logger = get_logger("checkpoint.run_checkpoint")

CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_FILE = "latest"
RUN_STATE_FILE = "run_state.json"
RUN_FORMAT_VERSION = 2
"""run_state.json's ``format_version``: 2 has manifest.json; none recorded is older (see predates_manifests)."""


def save_rng_states(path: Path) -> None:
    """This rank's Python, NumPy, torch, CUDA and Megatron model-parallel RNG states as tensors in a safetensors
    file (the few scalars in its metadata): nothing in it is unpickled when it is read back."""
    version, python_keys, gauss = random.getstate()
    generator, numpy_keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"python": torch.tensor(python_keys, dtype=torch.int64),
               "numpy": torch.from_numpy(numpy_keys.astype(np.int64)), "torch": torch.get_rng_state()}
    tensors |= {f"megatron.{name}": state.cpu() for name, state in
                tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    metadata = {"python": json.dumps([version, gauss]),
                "numpy": json.dumps([generator, position, has_gauss, cached_gaussian])}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata=metadata)


def load_rng_states(path: Path) -> None:
    """Restores the RNG states :func:`save_rng_states` wrote (safetensors: tensors and JSON, no pickle)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if {"python", "numpy", "torch"} - tensors.keys() or {"python", "numpy"} - metadata.keys():
        raise ValueError(f"{path}: not an RNG-state file of megatron-save (tensors {sorted(tensors)})")
    version, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    generator, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
    np.random.set_state((generator, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(tensors["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name.removeprefix("megatron."): state for name, state in tensors.items() if name.startswith("megatron.")})
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def rng_file(checkpoint: Path, rank: int) -> Path:
    """Rank ``rank``'s RNG-state file in a run checkpoint."""
    return checkpoint / "rng" / f"rank_{rank:05d}.safetensors"


def _layout() -> dict[str, int]:
    """World size and model-parallel sizes: RNG states are per rank, so a resume needs the same ones."""
    return {"world_size": dist.get_world_size(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size()}


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"a.b": value}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_changes(saved: dict[str, Any], current: dict[str, Any], may_change: tuple[str, ...]
                     ) -> list[str]:
    """The settings (dotted names) that differ between a checkpoint's run and this launch, except those in
    ``may_change`` (a name there also covers everything below it). Names only one side has (a setting added or
    removed by another version of megatron-save) are not compared."""
    saved, current = _flatten(saved), _flatten(current)
    changed = sorted(name for name in saved.keys() & current.keys() if saved[name] != current[name])
    free = lambda name: any(name == key or name.startswith(key + ".") for key in may_change)  # noqa: E731
    return [f"{name}: {saved[name]!r} -> {current[name]!r}" for name in changed if not free(name)]


def check_run_settings(checkpoint: str | Path, settings: dict[str, Any], may_change: tuple[str, ...] = ()) -> None:
    """Refuses to resume ``checkpoint`` with other ``settings`` than its run's (except ``may_change``), naming the
    changes; reads one small file, so a launch can call it before building any model."""
    try:
        saved = json.loads((Path(checkpoint) / RUN_STATE_FILE).read_text()).get("settings")
    except (OSError, ValueError) as error:  # a damaged checkpoint: the resume falls back to an older one
        logger.warning("%s: cannot read its settings yet (%s); checked once a checkpoint that verifies is chosen",
                       checkpoint, error)
        return
    if saved is None:
        logger.warning("%s records no settings (written by an older megatron-save): resuming without checking "
                       "that this launch has the run's settings", checkpoint)
        return
    changes = settings_changes(saved, settings, may_change)
    if changes:
        raise ValueError(f"{checkpoint} belongs to a run with other settings; resuming would mix two runs. "
                         f"Changed: {'; '.join(changes)}. Launch with the run's settings, or use a new output_dir")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` steps."""
    return f"step_{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None (not verified: see :func:`choose_resume_checkpoint`)."""
    marker = Path(run_dir) / CHECKPOINTS_SUBDIR / LATEST_FILE
    if not marker.exists():
        return None
    return marker.parent / marker.read_text().strip()


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints a resume may use, best first: the one ``latest`` names, then every other complete one,
    newest first."""
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    latest = latest_checkpoint(run_dir)
    others = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and p != latest),
                    reverse=True)
    return ([latest] if latest is not None else []) + others


def predates_manifests(checkpoint: Path) -> tuple[bool, str]:
    """Whether a run checkpoint's recorded format is older than manifests, and the record that says so: its run
    state records no format_version and none of its training checkpoints records the megatron-core that wrote it
    (megatron-save recorded that only after it wrote manifests)."""
    state = checkpoint / RUN_STATE_FILE
    records = [(state, "format_version")] + [(path, "megatron_core")
                                            for path in sorted(checkpoint.glob(f"*/{TRAIN_STATE_FILE}"))]
    for path, key in records:
        try:
            value = json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return False, f"{path} is unreadable"
        if value is not None:
            return False, f"{path} records {key} {value}"
    return True, f"{state} records no format_version"


def verify_run_checkpoint(checkpoint: Path, hashes: bool = True) -> None:
    """Raises CorruptCheckpointError naming the first bad file of a run checkpoint: against its manifest, or its
    missing manifest when its format has one; for one written before manifests, its run state."""
    if not checkpoint.is_dir():
        raise CorruptCheckpointError(f"{checkpoint}: missing")
    old, record = predates_manifests(checkpoint)
    if missing_manifest(checkpoint, old, record):
        logger.warning("%s has no manifest (%s, written by an older megatron-save): not verified", checkpoint, record)
    else:
        verify_manifest(checkpoint, hashes)
    try:
        json.loads((checkpoint / RUN_STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{checkpoint / RUN_STATE_FILE}: unreadable ({error})") from error


def choose_resume_checkpoint(run_dir: str | Path, verify: str = "hash") -> Path | None:
    """Collective: the best checkpoint of the run that verifies (``verify``: hash, size or off), or None when the
    run has none. When ``latest`` fails, the newest older one that verifies is taken, with a warning naming both;
    when none does, the error names every failure."""
    chosen, failures = [None], []
    if dist.get_rank() == 0:
        candidates = resume_candidates(run_dir)
        for candidate in candidates:
            try:
                if verify != "off":
                    verify_run_checkpoint(candidate, hashes=verify == "hash")
            except CorruptCheckpointError as error:
                failures.append(str(error))
                logger.warning("cannot resume from %s: %s", candidate, error)
                continue
            chosen = [str(candidate)]
            if failures:
                logger.warning("resuming from %s instead of the damaged %s", candidate, candidates[0])
            break
        if chosen[0] is None and failures:
            chosen = [f"error: {'; '.join(failures)}"]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is not None and chosen[0].startswith("error: "):
        raise CorruptCheckpointError(f"{run_dir}: no checkpoint verifies ({chosen[0][7:]}); start a new "
                                     "output_dir or set resume=false")
    return Path(chosen[0]) if chosen[0] is not None else None


def save_run_checkpoint(run_dir: str | Path, step: int, states: dict[str, TrainState], counters: dict[str, int],
                        keep: int, settings: dict[str, Any]) -> Path:
    """Collective: writes the checkpoint after ``step`` steps (with the run's ``settings``, JSON-serialisable),
    then points ``latest`` at it and deletes all but the ``keep`` newest."""
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    final = root / checkpoint_name(step)
    staging = root / f"{final.name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "rng").mkdir(parents=True)
    dist.barrier()
    for name, state in states.items():
        save_train_checkpoint(state, staging / name, step)
    save_rng_states(rng_file(staging, dist.get_rank()))
    dist.barrier()
    if dist.get_rank() == 0:
        state = {"format_version": RUN_FORMAT_VERSION, "step": step, "counters": counters, "layout": _layout(),
                 "settings": settings}
        (staging / RUN_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        write_manifest(staging)
        publish_directory(staging, final)
        atomic_write_text(root / LATEST_FILE, final.name + "\n")
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[: max(len(complete) - keep, 0)]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def remove_stale_staging(run_dir: str | Path) -> None:
    """Collective: deletes ``step_N.tmp`` directories an interrupted checkpoint write left (rank 0)."""
    if dist.get_rank() == 0:
        for staging in (Path(run_dir) / CHECKPOINTS_SUBDIR).glob("step_*.tmp"):
            logger.warning("removing %s, left by an interrupted checkpoint write", staging)
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()


def load_run_checkpoint(checkpoint: str | Path, states: dict[str, TrainState]) -> tuple[int, dict[str, int]]:
    """Collective: restores every trained model, optimizer and schedule, and this rank's RNG states; returns
    (step, counters). The run must have the same world size and TP / PP sizes (RNG states are per rank); check its
    settings first with :func:`check_run_settings`."""
    checkpoint = Path(checkpoint)
    payload = json.loads((checkpoint / RUN_STATE_FILE).read_text())
    if payload.get("layout", _layout()) != _layout():
        raise ValueError(f"{checkpoint} was written with {payload['layout']}; this launch has {_layout()}. Resume "
                         "with the same layout (each rank's RNG state is restored), or start a new output_dir")
    for name, state in states.items():
        if not (checkpoint / name).exists():
            raise FileNotFoundError(f"{checkpoint}: no {name}/ checkpoint; was the run saved with the same "
                                    "strategy and policy.frozen setting?")
        load_train_checkpoint(state, checkpoint / name)
    states = rng_file(checkpoint, dist.get_rank())
    if not states.exists():
        if list((checkpoint / "rng").glob("rank_*.pt")):
            raise FileNotFoundError(f"{checkpoint}: RNG states in pickle files (rng/rank_*.pt, an older "
                                    "megatron-save), which are not loaded since a pickle can run code; start a new "
                                    "output_dir, or resume with the version that wrote it")
        raise FileNotFoundError(f"{states}: no RNG state for rank {dist.get_rank()}; resume with the world size "
                                "the run was saved with")
    load_rng_states(states)
    return payload["step"], payload["counters"]
