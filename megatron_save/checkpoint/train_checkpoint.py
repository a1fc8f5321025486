"""Training checkpoints: model, optimizer (incl. distributed optimizer) and LR schedule with dist_checkpointing.

Layout of a training checkpoint directory::

    train_state.json   step and the LR scheduler's state
    state/             torch_dist checkpoint of {"model": ..., "optimizer": ...}

It loads at a different TP / PP / DP than it was saved at (``fully_reshardable`` optimizer sharding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_save.models.train_state import TrainState

TRAIN_STATE_FILE = "train_state.json"
STATE_SUBDIR = "state"
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class UnsupportedResumeError(RuntimeError):
    """A training checkpoint this environment's Megatron-Core cannot restore exactly."""


def distributed_optimizer_state_supported() -> bool:
    """Whether megatron-core can save and load the distributed optimizer's state here: it needs Transformer Engine
    or NVIDIA Apex (FusedAdam). With torch.optim.AdamW, 0.16.1 asserts on save unless every parameter took the same
    number of steps (a never-stepped optimizer, or one whose frozen parameters skipped steps, fails) and cannot load
    the state at all."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    return HAVE_APEX_OR_TE


def _check_resumable(state: TrainState) -> None:
    if state.optimizer.config.use_distributed_optimizer and not distributed_optimizer_state_supported():
        raise UnsupportedResumeError(
            "resuming the distributed optimizer needs Transformer Engine or NVIDIA Apex (FusedAdam): with "
            "torch.optim.AdamW, megatron-core 0.16.1 cannot load its state (KeyError 'step'). Resume with "
            "optim.use_distributed_optimizer=false, or install the GPU extras."
        )


def _sharded_state(state: TrainState, is_loading: bool) -> dict:
    model = state.module.sharded_state_dict()
    optimizer = state.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=_SHARDING)
    return {"model": model, "optimizer": optimizer}


def save_train_checkpoint(state: TrainState, ckpt_dir: str | Path, step: int) -> None:
    """Collective: writes the model, optimizer and schedule after ``step`` optimizer steps."""
    ckpt_dir = Path(ckpt_dir)
    if dist.get_rank() == 0:
        (ckpt_dir / STATE_SUBDIR).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(state, is_loading=False), str(ckpt_dir / STATE_SUBDIR),
                            content_metadata=_SHARDING)
    if dist.get_rank() == 0:
        payload = {"step": step, "scheduler": state.scheduler.state_dict()}
        (ckpt_dir / TRAIN_STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    dist.barrier()


def load_train_checkpoint(state: TrainState, ckpt_dir: str | Path) -> int:
    """Collective: restores model, optimizer and schedule into a freshly built ``state``; returns the step."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / TRAIN_STATE_FILE).exists():
        raise FileNotFoundError(f"{ckpt_dir}: no {TRAIN_STATE_FILE}; not a training checkpoint")
    _check_resumable(state)
    loaded = dist_checkpointing.load(_sharded_state(state, is_loading=True), str(ckpt_dir / STATE_SUBDIR))
    state.module.load_state_dict(loaded["model"])
    state.optimizer.load_state_dict(loaded["optimizer"])
    payload = json.loads((ckpt_dir / TRAIN_STATE_FILE).read_text())
    state.scheduler.load_state_dict(payload["scheduler"])
    # Each group's LR is a function of the step; recompute it so the value-head group gets its own again.
    state.scheduler.step(0)
    return payload["step"]
