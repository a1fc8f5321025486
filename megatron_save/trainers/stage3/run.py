"""A stage-3 run's setup and teardown: process groups, the policy, its reference, the reward model (and R2M's head,
or PRIME's implicit PRM) with their optimizers, the rollout engine, the prompts; the final models at the end."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoTokenizer

from megatron_save.checkpoint import build_model_from_checkpoint, read_checkpoint_meta, save_model_checkpoint
from megatron_save.checkpoint.hf.gather import gather_hf_state
from megatron_save.checkpoint.model_checkpoint import CheckpointMeta, HF_SUBDIR
from megatron_save.checkpoint.train_checkpoint import save_train_checkpoint
from megatron_save.config import check_recompute
from megatron_save.data.preference import PreferencePair, load_preference_pairs
from megatron_save.data.prompts import Prompt, load_prompts
from megatron_save.distributed import init_distributed
from megatron_save.models.families import family_for
from megatron_save.models.gpt_config import DTYPES, model_shape
from megatron_save.models.train_state import TrainState
from megatron_save.rollout import TransformersRolloutEngine
from megatron_save.rollout.distributed import is_rollout_rank, sync_weights
from megatron_save.rollout.engine import RolloutEngine
from megatron_save.rollout.megatron_engine import MegatronRolloutEngine
from megatron_save.rollout.vllm_engine import VLLMRolloutEngine
from megatron_save.trainers.offload import IdleOffload
from megatron_save.trainers.optimizer import build_train_state
from megatron_save.trainers.stage3.config import Stage3Config
from megatron_save.trainers.stage3.r2m import build_r2m_head
from megatron_save.trainers.stage3.verifier import load_verifier
from megatron_save.trainers.strategies import RMStrategy, strategy_named
from megatron_save.utils.files import publish_directory
from megatron_save.utils.logging import get_logger

logger = get_logger("trainers.stage3")


@dataclass
class Stage3Run:
    """The models, engine and data of a stage-3 run."""

    strategy: RMStrategy
    """The row of ``reward.strategy`` in the strategy table."""
    prompts: list[Prompt]
    """RL prompts, tokenized for the policy."""
    policy: Any
    """This rank's stage of the policy (unwrapped)."""
    policy_state: TrainState | None
    """Policy with optimizer and schedule; None when policy.frozen."""
    reference: Any | None
    """Frozen reference policy for the KL term; None when kl_coef is 0 or the policy is frozen."""
    reward_model: Any
    """This rank's stage of the reward model (unwrapped)."""
    reward_state: TrainState | None
    """Reward model with optimizer and schedule; None for a strategy that does not train its backbone."""
    engine: RolloutEngine | None
    """Rollout engine: transformers on the first rank of each model-parallel group (None elsewhere), or
    Megatron-Core's or vLLM's on every rank."""
    policy_tokenizer: Any
    """The policy's tokenizer (prompts, and decoding responses for the RM)."""
    reward_tokenizer: Any
    """The reward model's tokenizer (its chat template renders the scored conversations)."""
    policy_hf_config: Any
    """transformers config of the policy (weight-sync mapping)."""
    offline_pairs: list[PreferencePair] | None
    """Static preference pairs of a strategy that learns from them (offline_bt)."""
    r2m_state: TrainState | None = None
    """R2M's policy-feedback head with its optimizer (the r2m strategy; the reward model itself stays frozen)."""
    offload: IdleOffload | None = None
    """Moves idle optimizer states, gradient buffers and reference weights off the device between phases."""
    prm_state: TrainState | None = None
    """PRIME's implicit process reward model (a causal LM) with its optimizer (the prime strategy)."""
    prm_reference: Any | None = None
    """The PRM's frozen reference: the policy's reference itself when both come from the same checkpoint."""
    verifier: Callable[[str, str], float] | None = None
    """reward.verifier: PRIME's outcome labels (reward.prime.labels=verifier) or verifier_hl_bt's pairs."""
    probe_pairs: list[PreferencePair] | None = None
    """reward.probe_data: the pairs the reward model's accuracy is measured on at every step."""

    def trained_states(self) -> dict[str, TrainState]:
        """The models this run trains, by checkpoint name."""
        states = {"policy": self.policy_state, "reward": self.reward_state, "r2m_head": self.r2m_state,
                  "prm": self.prm_state}
        return {name: state for name, state in states.items() if state is not None}

    def sync_rollout_weights(self) -> None:
        """Collective: the rollout engine gets the Megatron policy's current weights (nothing to do for an engine
        that samples from the policy's own parameters)."""
        if getattr(self.engine, "shares_policy_weights", False):
            return
        sync_weights(self.engine, gather_hf_state(self.policy, family_for(self.policy_hf_config),
                                                  self.policy_hf_config))


def _megatron_engine(cfg: Stage3Config, policy: Any, tokenizer: Any, meta: CheckpointMeta, longest: int
                     ) -> RolloutEngine:
    return MegatronRolloutEngine(policy, tokenizer, longest, cfg.rollout.max_batch_size,
                                 return_logprobs=cfg.policy.rollout_correction.enabled)


def _vllm_engine(cfg: Stage3Config, policy: Any, tokenizer: Any, meta: CheckpointMeta, longest: int
                 ) -> RolloutEngine:
    return VLLMRolloutEngine(Path(cfg.policy.checkpoint) / HF_SUBDIR, cfg.rollout.vllm, DTYPES[meta.dtype], longest,
                             cfg.rollout.max_batch_size, cfg.seed,
                             return_logprobs=cfg.policy.rollout_correction.enabled)


def _transformers_engine(cfg: Stage3Config, policy: Any, tokenizer: Any, meta: CheckpointMeta, longest: int
                         ) -> RolloutEngine | None:
    if not is_rollout_rank():
        return None
    # Behaviour log-probs keep a full vocabulary of scores per generated token: asked for only by rollout
    # correction (otherwise the policy's own are recomputed).
    return TransformersRolloutEngine(Path(cfg.policy.checkpoint) / HF_SUBDIR, dtype=DTYPES[meta.dtype],
                                     max_batch_size=cfg.rollout.max_batch_size,
                                     return_logprobs=cfg.policy.rollout_correction.enabled)


ENGINES: dict[str, Callable[..., RolloutEngine | None]] = {
    "transformers": _transformers_engine, "megatron": _megatron_engine, "vllm": _vllm_engine}
"""``rollout.backend`` -> (cfg, policy, tokenizer, policy checkpoint meta, longest sequence) -> this rank's engine."""


def build_stage3_run(cfg: Stage3Config) -> Stage3Run:
    """Starts the process groups and builds the policy, reference, reward model and rollout engine."""
    strategy = strategy_named(cfg.reward.strategy)
    policy_meta, policy_hf = read_checkpoint_meta(cfg.policy.checkpoint)
    reward_meta, reward_hf = read_checkpoint_meta(cfg.reward.checkpoint)
    if policy_meta.kind != "causal_lm" or reward_meta.kind != "reward_model":
        raise ValueError(f"policy.checkpoint holds a {policy_meta.kind} and reward.checkpoint a {reward_meta.kind};"
                         " expected a causal_lm and a reward_model")
    if strategy.value_head and not reward_meta.value_head:
        raise ValueError(f"reward.strategy={strategy.name} needs a value head: {cfg.reward.checkpoint} has none; "
                         "run stage 2 (python -m megatron_save stage2) on it first")
    shapes = [model_shape(policy_hf, f"policy.checkpoint={cfg.policy.checkpoint}"),
              model_shape(reward_hf, f"reward.checkpoint={cfg.reward.checkpoint}")]
    recomputes = [("policy.recompute", cfg.policy.recompute, policy_hf),
                  ("reward.recompute", cfg.reward.recompute, reward_hf)]
    if strategy.implicit_prm:
        prm_hf = read_checkpoint_meta(prm_checkpoint(cfg))[1]
        shapes.append(model_shape(prm_hf, f"reward.prime.checkpoint={prm_checkpoint(cfg)}"))
        recomputes.append(("reward.prime.recompute", cfg.reward.prime.recompute, prm_hf))
    for name, settings, hf_config in recomputes:
        # The layout's layer counts, before any process group or model exists.
        check_recompute(settings, name, hf_config.num_hidden_layers // cfg.parallel.pipeline_model_parallel_size)
    init_distributed(cfg.parallel, *shapes)
    policy_tokenizer = AutoTokenizer.from_pretrained(Path(cfg.policy.checkpoint) / HF_SUBDIR)
    reward_tokenizer = AutoTokenizer.from_pretrained(Path(cfg.reward.checkpoint) / HF_SUBDIR)
    prompts, _ = load_prompts(cfg.train_data, policy_tokenizer, cfg.max_prompt_length, cfg.split)
    if len(prompts) < cfg.prompts_per_step:
        raise ValueError(f"{cfg.train_data}: {len(prompts)} usable prompts, fewer than prompts_per_step="
                         f"{cfg.prompts_per_step}")
    policy, _, _ = build_model_from_checkpoint(cfg.policy.checkpoint, recompute=None if cfg.policy.frozen else
                                               cfg.policy.recompute, recompute_name="policy.recompute")
    policy_state = None if cfg.policy.frozen else build_train_state(
        policy, cfg.policy.optim, cfg.total_steps * cfg.policy.mini_batches)
    reference = None
    if cfg.policy.kl_coef > 0 and not cfg.policy.frozen:
        reference = build_model_from_checkpoint(cfg.policy.checkpoint)[0].eval()
    reward_model, _, _ = build_model_from_checkpoint(
        cfg.reward.checkpoint, recompute=cfg.reward.recompute if strategy.trains_backbone else None,
        recompute_name="reward.recompute")
    reward_state = build_train_state(reward_model, cfg.reward.optim, cfg.total_steps) if strategy.trains_backbone \
        else None
    offline_pairs = None
    if strategy.learns_from == "offline_pairs":
        offline_pairs, _ = load_preference_pairs(cfg.reward.offline_data, reward_tokenizer, cfg.reward.max_length,
                                                 cfg.reward.offline_split)
    longest = cfg.max_prompt_length + cfg.rollout.sampling.max_new_tokens
    engine = ENGINES[cfg.rollout.backend](cfg, policy, policy_tokenizer, policy_meta, longest)
    r2m_state = None
    if strategy.rewards == "r2m_head":
        head = build_r2m_head(reward_model, policy, cfg.reward.r2m_width, cfg.seed)
        r2m_state = build_train_state(head, cfg.reward.optim, cfg.total_steps)
    run = Stage3Run(strategy, prompts, policy, policy_state, reference, reward_model, reward_state, engine,
                    policy_tokenizer, reward_tokenizer, policy_hf, offline_pairs, r2m_state)
    if strategy.implicit_prm:
        run.prm_state, run.prm_reference = _build_implicit_prm(cfg, policy_hf, reference)
    if cfg.reward.verifier:
        run.verifier = load_verifier(cfg.reward.verifier)
    if cfg.reward.probe_data:
        run.probe_pairs, _ = load_preference_pairs(cfg.reward.probe_data, reward_tokenizer, cfg.reward.max_length)
    run.offload = IdleOffload(cfg.offload, run.trained_states(), reference)
    return run


def prm_checkpoint(cfg: Stage3Config) -> str:
    """Where PRIME's implicit PRM and its reference start: reward.prime.checkpoint, else the policy's."""
    return cfg.reward.prime.checkpoint or cfg.policy.checkpoint


def _build_implicit_prm(cfg: Stage3Config, policy_hf: Any, policy_reference: Any | None
                        ) -> tuple[TrainState, Any]:
    """PRIME's implicit PRM with its optimizer, and its frozen reference (shared with the policy's when both
    start from the same checkpoint). The PRM must score the policy's tokens: same vocabulary."""
    source = prm_checkpoint(cfg)
    meta, hf_config = read_checkpoint_meta(source)
    if meta.kind != "causal_lm":
        raise ValueError(f"reward.prime.checkpoint={source} holds a {meta.kind}; PRIME's implicit PRM is a causal_lm")
    if hf_config.vocab_size != policy_hf.vocab_size:
        raise ValueError(f"reward.prime.checkpoint={source} has a vocabulary of {hf_config.vocab_size}, the policy "
                         f"{policy_hf.vocab_size}: the PRM must share the policy's tokenizer")
    prm, _, _ = build_model_from_checkpoint(source, recompute=cfg.reward.prime.recompute,
                                            recompute_name="reward.prime.recompute")
    state = build_train_state(prm, cfg.reward.prime.optim, cfg.total_steps)
    same_start = Path(source).resolve() == Path(cfg.policy.checkpoint).resolve()
    reference = policy_reference if same_start and policy_reference is not None else \
        build_model_from_checkpoint(source)[0].eval()
    return state, reference


def _publish(staging: Path, final: Path) -> None:
    """Collective: a finished final output, synced, replaces the one a relaunch of a finished run wrote before."""
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        publish_directory(staging, final)
    torch.distributed.barrier()


def _staging(final: Path) -> Path:
    """Collective: an empty directory beside ``final`` to write it in."""
    staging = final.with_name(f"{final.name}.tmp")
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    torch.distributed.barrier()
    return staging


def save_final_models(run: Stage3Run, cfg: Stage3Config) -> None:
    """The trained models as model checkpoints (convertible to HF with tools/convert_megatron_to_hf.py)."""
    for name, module, state, source in (("policy", run.policy, run.policy_state, cfg.policy.checkpoint),
                                        ("reward_model", run.reward_model, run.reward_state, cfg.reward.checkpoint),
                                        ("prm", run.prm_state and run.prm_state.module, run.prm_state,
                                         prm_checkpoint(cfg))):
        if state is None:
            continue
        meta, _ = read_checkpoint_meta(source)
        final = Path(cfg.output_dir) / name
        staging = _staging(final)
        save_model_checkpoint(module, staging, meta, Path(source) / HF_SUBDIR)
        _publish(staging, final)
    if run.r2m_state is not None:
        # R2M's trained part is its head (the reward model is unchanged): a training checkpoint of it.
        final = Path(cfg.output_dir) / "r2m_head"
        staging = _staging(final)
        save_train_checkpoint(run.r2m_state, staging, cfg.total_steps)
        _publish(staging, final)
    logger.info("stage 3 finished: %s", cfg.output_dir)
