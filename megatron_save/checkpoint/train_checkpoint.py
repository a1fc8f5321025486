"""Training checkpoints: model, optimizer (incl. distributed optimizer) and LR schedule with dist_checkpointing.

Layout of a training checkpoint directory::

    train_state.json   step, the LR scheduler's state, the megatron-core that wrote it and each param group's
                       lr_mult
    state/             torch_dist checkpoint of {"model": ..., "optimizer": ...}

It loads at a different TP / PP / DP than it was saved at (``fully_reshardable`` optimizer sharding), and on the
megatron-core release that wrote it or a newer one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_save.checkpoint.megatron_version import installed_megatron_core, refuse_newer_megatron_core
from megatron_save.models.train_state import TrainState

TRAIN_STATE_FILE = "train_state.json"
STATE_SUBDIR = "state"
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
VALUE_HEAD_GROUP = "megatron_save_value_head"
"""Key that marks the value head's param group (Megatron's ParamGroupOverride carries extra keys into the group):
set by trainers/optimizer.py."""
VALUE_HEAD_GROUP_TAG = 2.0
"""The value head group's lr_mult where megatron-core pairs saved and current param groups by keys that leave the
learning rate out (0.16 to 0.18: wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr), so groups that differ only
in max_lr would collide on load; every checkpoint of megatron-save before group tags were recorded has it."""


class UnsupportedResumeError(RuntimeError):
    """A training checkpoint this environment's Megatron-Core cannot restore exactly."""


def distributed_optimizer_state_supported() -> bool:
    """Whether megatron-core can save and load the distributed optimizer's state here: it needs Transformer Engine
    or NVIDIA Apex (FusedAdam), as megatron-core's own HAVE_APEX_OR_TE says. With torch.optim.AdamW, 0.16.1 to
    0.19.2 assert on save unless every parameter took the same number of steps (a never-stepped optimizer, or one
    whose frozen parameters skipped steps, fails) and cannot load the state at all."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    return HAVE_APEX_OR_TE


def _check_resumable(state: TrainState) -> None:
    if state.optimizer.config.use_distributed_optimizer and not distributed_optimizer_state_supported():
        raise UnsupportedResumeError(
            "resuming the distributed optimizer needs Transformer Engine or NVIDIA Apex (FusedAdam): with "
            "torch.optim.AdamW, megatron-core (0.16.1 to 0.19.2) cannot load its state (KeyError 'step'). Resume with "
            "optim.use_distributed_optimizer=false, or install the GPU extras."
        )


def _tag_groups_as_saved(state: TrainState, saved: list[float] | None, ckpt_dir: Path) -> None:
    """Gives the param groups the lr_mult tags they were saved with, since megatron-core pairs saved and current
    groups by keys that include lr_mult, and whether the value head's group is tagged depends on the release that
    built the optimizer: a run started where the tag is needed resumes on a release that needs none. Without a
    record (an older megatron-save) the value head's group carried VALUE_HEAD_GROUP_TAG. lr_mult only names
    groups: no schedule multiplies by it (trainers/optimizer.py checks)."""
    groups = state.optimizer.param_groups
    if saved is None:
        saved = [VALUE_HEAD_GROUP_TAG if group.get(VALUE_HEAD_GROUP) else group.get("lr_mult", 1.0) for group in groups]
    if len(saved) != len(groups):
        raise ValueError(f"{ckpt_dir / TRAIN_STATE_FILE}: {len(saved)} param groups saved, the optimizer built here "
                         f"has {len(groups)}; resume with the settings the run was saved with")
    for group, lr_mult in zip(groups, saved):
        group["lr_mult"] = lr_mult


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
        payload = {"step": step, "scheduler": state.scheduler.state_dict(), "megatron_core": installed_megatron_core(),
                   "group_lr_mults": [group.get("lr_mult", 1.0) for group in state.optimizer.param_groups]}
        (ckpt_dir / TRAIN_STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    dist.barrier()


def load_train_checkpoint(state: TrainState, ckpt_dir: str | Path) -> int:
    """Collective: restores model, optimizer and schedule into a freshly built ``state``; returns the step."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / TRAIN_STATE_FILE).exists():
        raise FileNotFoundError(f"{ckpt_dir}: no {TRAIN_STATE_FILE}; not a training checkpoint")
    payload = json.loads((ckpt_dir / TRAIN_STATE_FILE).read_text())
    refuse_newer_megatron_core(ckpt_dir, payload.get("megatron_core"))
    _check_resumable(state)
    _tag_groups_as_saved(state, payload.get("group_lr_mults"), ckpt_dir)
    loaded = dist_checkpointing.load(_sharded_state(state, is_loading=True), str(ckpt_dir / STATE_SUBDIR))
    state.module.load_state_dict(loaded["model"])
    state.optimizer.load_state_dict(loaded["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    # Each group's LR is a function of the step; recompute it so the value-head group gets its own again.
    state.scheduler.step(0)
    return payload["step"]
