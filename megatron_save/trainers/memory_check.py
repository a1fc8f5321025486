"""The launch check: every stage plans its per-GPU memory (megatron_save/planning/memory.py) before it builds a
model, logs the plan, and on a GPU refuses a run whose peak phase exceeds the device's memory less
``memory_check.margin_gib``, naming the phase, its parts and the cheapest settings the planner found that fit.

The configs are read here and only here (``stage3_layout``, ``training_layout``): the planner itself knows
nothing of them.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Callable

import torch

from megatron_save.checkpoint import read_checkpoint_meta
from megatron_save.models.spec import SpecBackend, resolve_backend
from megatron_save.planning.memory import (
    GIB,
    KNOBS,
    STAGE3_SETTINGS,
    TRAINING_SETTINGS,
    Architecture,
    MemoryLayout,
    MemoryPlan,
    Recompute,
    architecture_from_hf,
    candidate_layouts,
    memory_refusal,
    phase_table,
    plan_memory,
    plan_training,
    r2m_feedback_bytes,
    search_fits,
)
from megatron_save.trainers.strategies import strategy_named
from megatron_save.utils.logging import get_logger

logger = get_logger("trainers.memory_check")


class MemoryPlanError(RuntimeError):
    """The run's planned peak does not fit the device (the message says what to change)."""


def recompute_of(settings: Any) -> Recompute:
    """The planner's Recompute of a model's settings block (``policy``, ``reward`` or a stage config)."""
    block = settings.recompute
    return Recompute(block.granularity, block.method, block.num_layers)


def token_budget_of(settings: Any) -> int:
    """A settings block's ``max_tokens_per_micro_batch`` (0: fixed micro-batches)."""
    return settings.max_tokens_per_micro_batch


def world_size() -> int:
    """Processes of the launch (torchrun's WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _parallel(cfg: Any, world: int) -> dict[str, int]:
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    return dict(tp=tp, pp=pp, dp=max(1, world // (tp * pp)), ep=cfg.parallel.expert_model_parallel_size,
                etp=cfg.parallel.expert_tensor_parallel_size)


def stage3_layout(cfg: Any, world: int, dtype: str, value_head: bool, spec: str, fused_activation: bool
                  ) -> MemoryLayout:
    """The MemoryLayout of a stage-3 config on ``world`` processes (``dtype``, ``value_head``: the checkpoints';
    ``spec``, ``fused_activation``: what this machine builds)."""
    strategy = strategy_named(cfg.reward.strategy)
    vllm = cfg.rollout.vllm
    return MemoryLayout(
        **_parallel(cfg, world), dtype=dtype, micro_batch=cfg.policy.micro_batch_size,
        reward_micro_batch=cfg.reward.micro_batch_size * cfg.rollout.sampling.n,
        prompt_length=cfg.max_prompt_length, response_length=cfg.rollout.sampling.max_new_tokens,
        rollout_batch=cfg.rollout.max_batch_size,
        distributed_optimizer=bool(cfg.policy.optim.use_distributed_optimizer
                                   or cfg.reward.optim.use_distributed_optimizer),
        policy_recompute=recompute_of(cfg.policy), reward_recompute=recompute_of(cfg.reward),
        max_tokens_per_micro_batch=token_budget_of(cfg.policy),
        reward_max_tokens_per_micro_batch=token_budget_of(cfg.reward),
        offload_optimizer=cfg.offload.optimizer, offload_gradients=cfg.offload.gradients,
        offload_reference=cfg.offload.reference, reference=cfg.policy.kl_coef > 0 and not cfg.policy.frozen,
        reward_trained=strategy.trains_backbone, value_head=value_head, rollout_backend=cfg.rollout.backend,
        vllm_kv_cache_bytes=None if vllm.kv_cache_memory_gib is None else int(vllm.kv_cache_memory_gib * GIB),
        vllm_sleep=vllm.sleep_between_rollouts, spec=spec, fused_activation=fused_activation)


def training_layout(cfg: Any, world: int, dtype: str, sequences: int, value_head: bool, spec: str,
                    fused_activation: bool, rows_per_example: int = 1) -> MemoryLayout:
    """The MemoryLayout of a stage 1 / stage 2 / SFT config: one model, planned through the policy fields, with
    ``sequences`` per micro-batch of ``data.max_length`` tokens, ``rows_per_example`` of them kept together."""
    batch = cfg.batch
    return MemoryLayout(
        **_parallel(cfg, world), dtype=dtype, micro_batch=sequences, prompt_length=cfg.data.max_length,
        response_length=0, distributed_optimizer=cfg.optim.use_distributed_optimizer,
        policy_recompute=recompute_of(cfg), max_tokens_per_micro_batch=token_budget_of(batch),
        value_head=value_head, spec=spec, fused_activation=fused_activation, rows_per_example=rows_per_example)


def device_memory() -> int | None:
    """Bytes of this process's GPU (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def _machine() -> tuple[str, bool]:
    """(the layer spec this machine builds, whether SwiGLU is fused): TE on a GPU that has it, else local."""
    spec = "te" if resolve_backend(SpecBackend.AUTO) is SpecBackend.TRANSFORMER_ENGINE else "local"
    return spec, torch.cuda.is_available()


def check_plan(plan: MemoryPlan, plan_of: Callable[[MemoryLayout], MemoryPlan], knobs: tuple[str, ...],
               names: dict[str, str], device_bytes: int | None, margin_gib: float, enabled: bool,
               candidates: list[MemoryLayout], what: str) -> None:
    """Logs ``plan``; with ``device_bytes`` (a GPU) and ``enabled``, raises MemoryPlanError when its peak exceeds
    ``device_bytes`` less ``margin_gib``, naming the cheapest fitting variants among ``candidates`` (parallel
    layouts) x ``knobs`` (``plan_of`` plans one)."""
    if margin_gib < 0:
        raise ValueError(f"memory_check.margin_gib={margin_gib} must be >= 0")
    logger.info("%s: planned memory per GPU (megatron_save/planning/memory.py)\n%s", what,
                "\n".join(phase_table(plan)))
    if device_bytes is None:
        logger.info("%s: no GPU, so the plan is not checked against a device", what)
        return
    margin = int(margin_gib * GIB)
    if plan.peak <= device_bytes - margin:
        return
    if not enabled:
        logger.warning("%s: the planned peak %.2f GiB exceeds this GPU's %.2f GiB less memory_check.margin_gib=%g;"
                       " starting anyway (memory_check.enabled=false)", what, plan.peak / GIB, device_bytes / GIB,
                       margin_gib)
        return
    fits = search_fits(plan_of, candidates, device_bytes - margin, knobs)
    raise MemoryPlanError(f"{what}: " + memory_refusal(plan, device_bytes, margin, fits, names))


def _architecture(checkpoint: str, setting: str) -> tuple[Architecture, Any]:
    meta, hf_config = read_checkpoint_meta(checkpoint)
    return architecture_from_hf(hf_config, reward_model=meta.kind == "reward_model",
                                source=f"{setting}={checkpoint}"), meta


def _unplannable(what: str, error: ValueError) -> None:
    # The layout checks of init_distributed and the settings' own checks refuse such a run with their own
    # message; the plan only says why it is missing.
    logger.warning("%s: no memory plan (%s); starting without the memory check", what, error)


def check_stage3_memory(cfg: Any, device_bytes: int | None = None) -> MemoryPlan | None:
    """Plans a stage-3 config from its checkpoints' configs and checks it (``device_bytes``: the GPU's, by
    default this process's; None on CPU). Returns the plan (None when the planner cannot split the models)."""
    spec, fused = _machine()
    try:
        policy, policy_meta = _architecture(cfg.policy.checkpoint, "policy.checkpoint")
        reward, reward_meta = _architecture(cfg.reward.checkpoint, "reward.checkpoint")
        layout = stage3_layout(cfg, world_size(), policy_meta.dtype, reward_meta.value_head, spec, fused)
        plan_of = lambda variant: plan_memory(policy, reward, variant)  # noqa: E731
        plan = plan_of(layout)
    except ValueError as error:
        _unplannable("stage 3", error)
        return None
    if strategy_named(cfg.reward.strategy).implicit_prm:
        logger.warning("stage 3: the memory plan leaves out PRIME's trained PRM (reward.prime): its weights, "
                       "gradients, optimizer states and activations come on top of the planned peak")
    if strategy_named(cfg.reward.strategy).rewards == "r2m_head":
        responses, tokens = cfg.prompts_per_step * cfg.rollout.sampling.n, layout.prompt_length + layout.response_length
        logger.warning("stage 3: the memory plan leaves out R2M's feedback, the policy's fp32 hidden states of the "
                       "step's %d responses x %d tokens: at least %.2f GiB on every GPU on top of the planned peak "
                       "(twice that while they are gathered)", responses, tokens,
                       r2m_feedback_bytes(policy, responses, tokens) / GIB)
    gpus = layout.tp * layout.pp * layout.dp
    check_plan(plan, plan_of, KNOBS, STAGE3_SETTINGS, device_memory() if device_bytes is None else device_bytes,
               cfg.memory_check.margin_gib, cfg.memory_check.enabled, candidate_layouts(policy, reward, gpus, layout),
               "stage 3")
    return plan


def check_training_memory(cfg: Any, what: str, sequences: int, backbone_trained: bool = True,
                          device_bytes: int | None = None, rows_per_example: int = 1) -> MemoryPlan | None:
    """Plans a stage 1 / stage 2 / SFT config (``sequences`` per micro-batch of ``data.max_length`` tokens,
    ``rows_per_example`` of them kept together by a token budget) and checks it as ``check_stage3_memory`` does."""
    spec, fused = _machine()
    try:
        model, meta = _architecture(cfg.checkpoint, "checkpoint")
        value_head = meta.value_head or not backbone_trained  # stage 2 adds the value head
        layout = training_layout(cfg, world_size(), meta.dtype, sequences, value_head, spec, fused, rows_per_example)
        if not backbone_trained:  # stage 2's scoring forward reads score_micro_batch_size sequences, budget or not
            layout = replace(layout, max_tokens_per_micro_batch=0)
        plan_of = lambda variant: plan_training(model, variant, backbone_trained)  # noqa: E731
        plan = plan_of(layout)
    except ValueError as error:
        _unplannable(what, error)
        return None
    gpus = layout.tp * layout.pp * layout.dp
    # Stage 2: recompute only (its backbone trains at LR 0 at PP > 1; a token budget leaves its scoring as it is).
    knobs = ("policy_recompute", "max_tokens_per_micro_batch") if backbone_trained else ("policy_recompute",)
    check_plan(plan, plan_of, knobs, TRAINING_SETTINGS, device_memory() if device_bytes is None else device_bytes,
               cfg.memory_check.margin_gib, cfg.memory_check.enabled, candidate_layouts(model, model, gpus, layout),
               what)
    return plan
