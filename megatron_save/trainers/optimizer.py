"""Megatron DDP + optimizer + LR schedule with separate learning rates for the value head."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_save.checkpoint.train_checkpoint import VALUE_HEAD_GROUP, VALUE_HEAD_GROUP_TAG
from megatron_save.distributed.init import ParallelLayoutError
from megatron_save.models.train_state import TrainState

VALUE_HEAD_PARAMS = "*value_head*"
DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimizerSettings:
    """Adam with warm-up and decay; backbone + reward head and the value head have their own peak LR."""

    lr: float = 1e-6
    """Peak learning rate of the backbone and the reward head (paper, stage 3: 1e-7)."""
    value_head_lr: float = 1e-5
    """Peak learning rate of the value head (paper: 2e-4 in stage 2, 1e-5 in stage 3)."""
    min_lr_ratio: float = 0.0
    """Each group's final learning rate as a fraction of its peak."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to the peak."""
    decay_style: str = "cosine"
    """Decay after warm-up: constant, linear or cosine."""
    weight_decay: float = 0.0
    """Decoupled weight decay (never applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (ZeRO-1)."""


def build_train_state(
    model: torch.nn.Module, settings: OptimizerSettings, total_steps: int, freeze_all_but_value_head: bool = False
) -> TrainState:
    """Wraps ``model`` in Megatron DDP and builds its optimizer and schedule for ``total_steps`` steps.

    ``freeze_all_but_value_head`` (stage 2) trains only the value head. Without pipeline parallelism the rest is
    frozen outright (no gradients, no optimizer state). With it, every stage must send and receive gradients as
    Megatron's schedule expects, so the backbone and reward head stay trainable at a learning rate of exactly zero.
    """
    config = model.config
    if config.num_moe_experts and config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
        raise ParallelLayoutError(
            f"a MoE model trains at tensor_model_parallel_size={config.tensor_model_parallel_size} only with "
            "parallel.sequence_parallel=true (Megatron-Core's MoE layer refuses tensor parallelism without it); "
            "or use expert_model_parallel_size / expert_tensor_parallel_size with TP=1")
    if freeze_all_but_value_head and parallel_state.get_pipeline_model_parallel_world_size() == 1:
        for name, param in model.named_parameters():
            param.requires_grad_(fnmatch.fnmatch(name, VALUE_HEAD_PARAMS))
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=settings.use_distributed_optimizer
        ),
        module=model,
    )
    backbone_lr = 0.0 if freeze_all_but_value_head else settings.lr
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=backbone_lr,
        min_lr=backbone_lr * settings.min_lr_ratio,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    # Passing overrides replaces Megatron's standard ones (no weight decay on biases and norms): keep them.
    overrides = get_standard_config_overrides(optimizer_config)
    overrides[ParamKey(name=VALUE_HEAD_PARAMS)] = {
        "max_lr": settings.value_head_lr,
        "min_lr": settings.value_head_lr * settings.min_lr_ratio,
        VALUE_HEAD_GROUP: True,
        **({"lr_mult": VALUE_HEAD_GROUP_TAG} if param_groups_collide_on_load() else {}),
    }
    optimizer = get_megatron_optimizer(optimizer_config, [ddp], config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=backbone_lr,
        min_lr=backbone_lr * settings.min_lr_ratio,
        lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=max(total_steps, settings.warmup_steps + 1),
        lr_decay_style=settings.decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    _check_group_learning_rates(scheduler)
    # The pipeline schedule reduces gradients over data-parallel ranks (and ties embedding gradients across
    # stages) only through these hooks; without them every rank would step on its own local gradient.
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return TrainState(model=ddp, optimizer=optimizer, scheduler=scheduler)


def param_groups_collide_on_load() -> bool:
    """Whether the installed megatron-core pairs a checkpoint's param groups with the optimizer's by keys that leave
    the learning rate out (its ``param_group_identifier_keys``: 0.16 to 0.18 use wd_mult, lr_mult,
    is_expert_parallel and is_decoupled_lr; 0.19 adds max_lr and min_lr). Where they do, groups that differ only in
    their learning rate collide on resume (the distributed optimizer silently swaps them, the plain one raises), and
    the value head's group gets a distinct lr_mult, VALUE_HEAD_GROUP_TAG."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return not {"max_lr", "min_lr"} <= set(param_group_identifier_keys)


def is_value_head_group(group: dict) -> bool:
    """Whether an optimizer param group is the value head's: marked VALUE_HEAD_GROUP, or in a group restored from a
    checkpoint of an older megatron-save, tagged with VALUE_HEAD_GROUP_TAG."""
    return bool(group.get(VALUE_HEAD_GROUP)) or group.get("lr_mult") == VALUE_HEAD_GROUP_TAG


def _check_group_learning_rates(scheduler: OptimizerParamScheduler) -> None:
    """Each group's LR must be the scheduler's value for that group: a Megatron release that applied
    ``lr_mult`` would silently scale the value head's learning rate by the tag."""
    for group in scheduler.optimizer.param_groups:
        if not math.isclose(group["lr"], scheduler.get_lr(group), rel_tol=1e-6, abs_tol=1e-12):
            raise RuntimeError(
                f"param group with lr_mult={group.get('lr_mult')} runs at lr={group['lr']}, the schedule says "
                f"{scheduler.get_lr(group)}: this megatron-core applies lr_mult; adapt VALUE_HEAD_GROUP_TAG"
            )


@contextmanager
def backbone_frozen(state: TrainState) -> Iterator[None]:
    """Optimizer steps taken inside leave everything but the value head unchanged (learning rate 0; the groups'
    scheduled rates come back on the scheduler's next step, which ``train_step`` takes)."""
    groups = [g for g in state.optimizer.param_groups if not is_value_head_group(g)]
    for group in groups:
        group["lr"] = 0.0
    yield


def scale_backbone_gradients(state: TrainState, factor: float) -> None:
    """Multiplies the reduced gradients of everything but the value head by ``factor`` (before the optimizer
    step): Megatron's own per-token-loss normalisation scales every gradient by one global count after the
    data-parallel reduction; a loss whose terms have their own counts on disjoint parameters scales each part."""
    for name, param in state.model.named_parameters():
        if param.requires_grad and not fnmatch.fnmatch(name, VALUE_HEAD_PARAMS):
            param.main_grad.mul_(factor)


def group_learning_rates(state: TrainState) -> dict[str, float]:
    """Current LR of the value-head group and of the rest (for logging and tests)."""
    rates = {}
    for group in state.optimizer.param_groups:
        name = "value_head" if is_value_head_group(group) else "backbone"
        rates.setdefault(name, group["lr"])
    return rates
