"""Stage 3: RL with an online, self-improving reward model (paper Algorithm 2), and every baseline of the paper
through ``reward.strategy`` and ``policy.frozen``.

    torchrun --nproc-per-node N -m megatron_save stage3 CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import random
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from megatron_save.algorithms import r2m_time_weight
from megatron_save.checkpoint import build_model_from_checkpoint, read_checkpoint_meta, save_model_checkpoint
from megatron_save.checkpoint.hf import family_for
from megatron_save.checkpoint.hf.gather import gather_hf_state
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.checkpoint.train_checkpoint import save_train_checkpoint
from megatron_save.checkpoint.run_checkpoint import (
    check_run_settings,
    latest_checkpoint,
    load_run_checkpoint,
    save_run_checkpoint,
)
from megatron_save.data.batching import pad_id_of
from megatron_save.data.preference import PreferencePair, load_preference_pairs
from megatron_save.data.prompts import Prompt, load_prompts
from megatron_save.distributed import init_distributed
from megatron_save.distributed.init import check_parallel_layout
from megatron_save.models.gpt_config import DTYPES, model_shape
from megatron_save.rollout import TransformersRolloutEngine
from megatron_save.rollout.megatron_engine import MegatronRolloutEngine
from megatron_save.rollout.distributed import generate_data_parallel, is_rollout_rank, sync_weights
from megatron_save.rollout.vllm_engine import VLLMRolloutEngine
from megatron_save.trainers.common import ensure_output_dir, progress, run_from_command_line
from megatron_save.trainers.offload import IdleOffload
from megatron_save.trainers.optimizer import TrainState, build_train_state
from megatron_save.trainers.policy_update import policy_mini_batches, policy_rows, token_advantages, update_policy
from megatron_save.trainers.rl_groups import (
    FeedbackPartition,
    append_rollout_log,
    GroupScores,
    RolloutGroups,
    feedback_metrics,
    filter_threshold,
    non_finite_scores,
    partition_feedback,
    prepare_groups,
    rm_update_feedback,
    rollout_metrics,
    score_groups,
)
from megatron_save.trainers.r2m_update import (
    build_r2m_head,
    collect_feedback,
    policy_hidden_states,
    r2m_rewards,
    update_r2m_head,
)
from megatron_save.trainers.rm_update import TRAINED_STRATEGIES, update_reward_model
from megatron_save.trainers.stage3_config import Stage3Config, check_stage3_config
from megatron_save.utils.logging import get_logger
from megatron_save.utils.metrics import MetricsWriter, PhaseTimer, truncate_history

logger = get_logger("trainers.stage3_save")
ROLLOUT_LOG = "rollouts.jsonl"
# Settings a resumed launch may change: they do not change what the run computes (offload moves tensors only).
RESUMABLE_CHANGES = ("output_dir", "exit_after_steps", "resume", "save_every", "keep_checkpoints", "log_every",
                     "rollout_log", "tensorboard", "wandb_project", "offload", "parallel.timeout_minutes",
                     "rollout.vllm.gpu_memory_utilization", "rollout.vllm.sleep_between_rollouts",
                     "rollout.vllm.enforce_eager")


@dataclass
class Stage3Run:
    """The models, engine and data of a stage-3 run."""

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
    """Reward model with optimizer and schedule; None for the frozen strategy."""
    engine: TransformersRolloutEngine | MegatronRolloutEngine | VLLMRolloutEngine | None
    """Rollout engine: transformers on the first rank of each model-parallel group (None elsewhere), or
    Megatron-Core's or vLLM's on every rank."""
    policy_tokenizer: Any
    """The policy's tokenizer (prompts, and decoding responses for the RM)."""
    reward_tokenizer: Any
    """The reward model's tokenizer (its chat template renders the scored conversations)."""
    policy_hf_config: Any
    """transformers config of the policy (weight-sync mapping)."""
    offline_pairs: list[PreferencePair] | None
    """Static preference pairs of the offline_bt strategy."""
    r2m_state: TrainState | None = None
    """R2M's policy-feedback head with its optimizer (the r2m strategy; the reward model itself stays frozen)."""
    offload: IdleOffload | None = None
    """Moves idle optimizer states, gradient buffers and reference weights off the device between phases."""

    def trained_states(self) -> dict[str, TrainState]:
        """The models this run trains, by checkpoint name."""
        states = {"policy": self.policy_state, "reward": self.reward_state, "r2m_head": self.r2m_state}
        return {name: state for name, state in states.items() if state is not None}

    def sync_rollout_weights(self) -> None:
        """Collective: the rollout engine gets the Megatron policy's current weights (nothing to do for an engine
        that samples from the policy's own parameters)."""
        if getattr(self.engine, "shares_policy_weights", False):
            return
        sync_weights(self.engine, gather_hf_state(self.policy, family_for(self.policy_hf_config),
                                                  self.policy_hf_config))


def build_stage3_run(cfg: Stage3Config) -> Stage3Run:
    """Starts the process groups and builds the policy, reference, reward model and rollout engine."""
    policy_meta, policy_hf = read_checkpoint_meta(cfg.policy.checkpoint)
    reward_meta, reward_hf = read_checkpoint_meta(cfg.reward.checkpoint)
    if policy_meta.kind != "causal_lm" or reward_meta.kind != "reward_model":
        raise ValueError(f"policy.checkpoint holds a {policy_meta.kind} and reward.checkpoint a {reward_meta.kind};"
                         " expected a causal_lm and a reward_model")
    if cfg.reward.strategy.startswith("save") and not reward_meta.value_head:
        raise ValueError(f"reward.strategy={cfg.reward.strategy} needs a value head: {cfg.reward.checkpoint} has "
                         "none; run stage 2 (megatron_save.trainers.stage2_value) on it first")
    init_distributed(cfg.parallel, model_shape(policy_hf))
    check_parallel_layout(cfg.parallel, torch.distributed.get_world_size(), model_shape(reward_hf))
    policy_tokenizer = AutoTokenizer.from_pretrained(Path(cfg.policy.checkpoint) / HF_SUBDIR)
    reward_tokenizer = AutoTokenizer.from_pretrained(Path(cfg.reward.checkpoint) / HF_SUBDIR)
    prompts, _ = load_prompts(cfg.train_data, policy_tokenizer, cfg.max_prompt_length, cfg.split)
    if len(prompts) < cfg.prompts_per_step:
        raise ValueError(f"{cfg.train_data}: {len(prompts)} usable prompts, fewer than prompts_per_step="
                         f"{cfg.prompts_per_step}")
    policy, _, _ = build_model_from_checkpoint(cfg.policy.checkpoint)
    policy_state = None if cfg.policy.frozen else build_train_state(
        policy, cfg.policy.optim, cfg.total_steps * cfg.policy.mini_batches)
    reference = None
    if cfg.policy.kl_coef > 0 and not cfg.policy.frozen:
        reference = build_model_from_checkpoint(cfg.policy.checkpoint)[0].eval()
    reward_model, _, _ = build_model_from_checkpoint(cfg.reward.checkpoint)
    trained = cfg.reward.strategy in TRAINED_STRATEGIES
    reward_state = build_train_state(reward_model, cfg.reward.optim, cfg.total_steps) if trained else None
    offline_pairs = None
    if cfg.reward.strategy == "offline_bt":
        offline_pairs, _ = load_preference_pairs(cfg.reward.offline_data, reward_tokenizer, cfg.reward.max_length,
                                                 cfg.reward.offline_split)
    engine, longest = None, cfg.max_prompt_length + cfg.rollout.sampling.max_new_tokens
    if cfg.rollout.backend == "megatron":
        engine = MegatronRolloutEngine(policy, policy_tokenizer, longest, cfg.rollout.max_batch_size)
    elif cfg.rollout.backend == "vllm":
        engine = VLLMRolloutEngine(Path(cfg.policy.checkpoint) / HF_SUBDIR, cfg.rollout.vllm,
                                   DTYPES[policy_meta.dtype], longest, cfg.rollout.max_batch_size, cfg.seed)
    elif is_rollout_rank():
        # Behaviour log-probs are not needed (the policy's own are recomputed) and would keep a full vocabulary
        # of scores per generated token.
        engine = TransformersRolloutEngine(Path(cfg.policy.checkpoint) / HF_SUBDIR, dtype=DTYPES[policy_meta.dtype],
                                           max_batch_size=cfg.rollout.max_batch_size, return_logprobs=False)
    r2m_state = None
    if cfg.reward.strategy == "r2m":
        head = build_r2m_head(reward_model, policy, cfg.reward.r2m_width, cfg.seed)
        r2m_state = build_train_state(head, cfg.reward.optim, cfg.total_steps)
    run = Stage3Run(prompts, policy, policy_state, reference, reward_model, reward_state, engine, policy_tokenizer,
                    reward_tokenizer, policy_hf, offline_pairs, r2m_state)
    run.offload = IdleOffload(cfg.offload, run.trained_states(), reference)
    return run


_SUMMARY = ("filter/reward_mean", "filter/keep_rate", "filter/kept_prompts_fraction", "rm/reward_loss",
            "rm/value_loss", "rm/grebt_loss", "rm/bt_loss", "policy/pg_loss", "policy/kl_to_reference",
            "policy/entropy", "rollout/response_length", "time/step_s")


def step_summary(metrics: dict[str, float]) -> str:
    """The few numbers worth a log line, of those the step has."""
    return " ".join(f"{name.split('/')[-1]}={metrics[name]:.4g}" for name in _SUMMARY
                    if metrics.get(name) is not None)


def counter_metrics(counters: Counter) -> dict[str, float]:
    """The run's running counts (skipped steps, value-only updates, ...) as metrics."""
    return {f"counters/{name}": float(count) for name, count in counters.items()}


def finish_step(metrics: dict[str, float], timer: PhaseTimer, counters: Counter,
                completed: RolloutGroups | None = None) -> dict[str, float]:
    """A step's metrics with its phase timings and the run's counters; for a completed step (its groups given),
    the response tokens per second too."""
    metrics = {**metrics, **timer.reset()}
    if completed is not None:
        metrics["throughput/response_tokens_per_s"] = completed.response_lengths.sum().item() / metrics["time/step_s"]
    return {**metrics, **counter_metrics(counters)}


def prompt_batch(prompts: list[Prompt], batch_size: int, step: int, seed: int) -> list[Prompt]:
    """The prompts of ``step`` (1-based): epochs of a seeded shuffle cut into batches, a function of the step
    alone so that a resumed run continues the same sequence (an incomplete last batch of an epoch is dropped)."""
    per_epoch = len(prompts) // batch_size
    epoch, index = divmod(step - 1, per_epoch)
    order = list(range(len(prompts)))
    random.Random(seed + epoch).shuffle(order)
    return [prompts[i] for i in order[index * batch_size : (index + 1) * batch_size]]


def train_stage3(cfg: Stage3Config) -> Path:
    check_stage3_config(cfg)
    settings = asdict(cfg)
    checkpoint = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if checkpoint is not None:
        check_run_settings(checkpoint, settings, RESUMABLE_CHANGES)  # before minutes of model building
    run = build_stage3_run(cfg)
    ensure_output_dir(cfg.output_dir, resuming=checkpoint is not None)
    start, counters = 0, Counter()
    if checkpoint is not None:
        start, saved = load_run_checkpoint(checkpoint, run.trained_states())
        counters.update(saved)
        truncate_history(Path(cfg.output_dir) / "metrics.jsonl", start)
        truncate_history(Path(cfg.output_dir) / ROLLOUT_LOG, start)
        logger.info("resumed from %s at step %d", checkpoint, start)
    run.sync_rollout_weights()
    run.offload.offload_all()
    writer = MetricsWriter(cfg.output_dir, cfg.tensorboard, cfg.wandb_project, settings)
    bar = progress(cfg.total_steps, f"stage 3 ({cfg.reward.strategy})")
    bar.update(start)
    last = min(cfg.total_steps, start + cfg.exit_after_steps) if cfg.exit_after_steps else cfg.total_steps
    for step in range(start + 1, last + 1):
        metrics = rl_step(run, cfg, step, counters)
        writer.write(step, metrics)
        if cfg.log_every and step % cfg.log_every == 0:
            logger.info("step %d/%d: %s", step, cfg.total_steps, step_summary(metrics))
        bar.set_postfix(reward=f"{metrics.get('filter/reward_mean', float('nan')):.3f}",
                        keep=f"{metrics.get('filter/keep_rate', float('nan')):.2f}")
        bar.update()
        if step == last or (cfg.save_every and step % cfg.save_every == 0):
            with run.offload.resident(*run.trained_states()):
                save_run_checkpoint(cfg.output_dir, step, run.trained_states(), dict(counters), cfg.keep_checkpoints,
                                    settings)
    bar.close()
    writer.close()
    if last == cfg.total_steps:
        with run.offload.resident(*run.trained_states()):  # R2M's final checkpoint holds its optimizer
            save_final_models(run, cfg)
    else:
        logger.info("exit_after_steps=%d reached at step %d; launch again to resume", cfg.exit_after_steps, last)
    return Path(cfg.output_dir)


def rl_step(run: Stage3Run, cfg: Stage3Config, step: int, counters: Counter) -> dict[str, float]:
    """One step of Algorithm 2: rollout, score, partition, RM update, re-score and filter, policy update."""
    timer, strategy = PhaseTimer(), cfg.reward.strategy
    if strategy == "r2m":
        return r2m_step(run, cfg, step, counters)
    rm_pad, score_micro_batch = pad_id_of(run.reward_tokenizer), cfg.reward.micro_batch_size * cfg.rollout.sampling.n
    with timer.phase("rollout"):
        groups = sample_groups(run, cfg, step)
    with timer.phase("score"):
        scores = score_groups(run.reward_model, groups, rm_pad, score_micro_batch)
    metrics = rollout_metrics(groups)
    if non_finite_scores(scores, groups.valid):
        counters["steps_skipped_non_finite_scores"] += 1
        logger.warning("step %d: non-finite reward-model scores; step skipped (%d so far)", step,
                       counters["steps_skipped_non_finite_scores"])
        return finish_step(metrics, timer, counters)
    threshold = filter_threshold(strategy, step, cfg.total_steps, cfg.reward.initial_margin)
    partition = partition_feedback(strategy, scores, groups.valid, threshold)
    metrics |= feedback_metrics(groups, scores, partition, "filter")
    log_rollouts(run, cfg, step, groups, scores, partition)
    if run.reward_state is not None:
        rm_groups, rm_partition = rm_update_feedback(strategy, groups, scores, partition,
                                                     cfg.reward.update_skips_truncated)
        metrics["rm/truncated_left_out"] = float((groups.valid & ~rm_groups.valid).sum())
        if strategy.startswith("save") and not rm_partition.prompt_keep.any():
            counters["value_only_rm_updates"] += 1
            logger.info("step %d: no prompt with both Y+ and Y- for the RM update; value-only update", step)
        with timer.phase("rm_update"), run.offload.resident("reward"):
            metrics |= update_reward_model(run.reward_state, cfg.reward, rm_groups, scores, rm_partition, step,
                                           rm_pad, cfg.seed, run.offline_pairs)
        with timer.phase("rescore"):
            scores = score_groups(run.reward_model, groups, rm_pad, score_micro_batch)
        if non_finite_scores(scores, groups.valid):
            counters["policy_updates_skipped_non_finite_scores"] += 1
            logger.warning("step %d: non-finite scores after the RM update; policy update skipped", step)
            return finish_step(metrics, timer, counters)
        partition = partition_feedback(strategy, scores, groups.valid, threshold)
        metrics |= feedback_metrics(groups, scores, partition, "filter_after_rm_update")
    if run.policy_state is not None:
        metrics |= train_policy(run, cfg, groups, scores, partition, counters, timer, step)
    return finish_step(metrics, timer, counters, completed=groups)


def sample_groups(run: Stage3Run, cfg: Stage3Config, step: int) -> RolloutGroups:
    """Collective: the step's prompts, G sampled responses each, prepared for the policy and the reward model."""
    prompts = prompt_batch(run.prompts, cfg.prompts_per_step, step, cfg.seed)
    rollouts = generate_data_parallel(run.engine, [p.ids for p in prompts], cfg.rollout.sampling,
                                      seed=cfg.seed + 7919 * step)
    return prepare_groups(rollouts, prompts, run.policy_tokenizer, run.reward_tokenizer, cfg.reward.max_length,
                          cfg.rollout.drop_truncated)


def log_rollouts(run: Stage3Run, cfg: Stage3Config, step: int, groups: RolloutGroups, scores: GroupScores,
                 partition: FeedbackPartition) -> None:
    """With ``rollout_log``: the step's rollouts, scores before any RM update, and filter decisions (rank 0)."""
    if cfg.rollout_log and torch.distributed.get_rank() == 0:
        append_rollout_log(Path(cfg.output_dir) / ROLLOUT_LOG, step, groups, scores, partition,
                           run.policy_tokenizer)


def r2m_step(run: Stage3Run, cfg: Stage3Config, step: int, counters: Counter) -> dict[str, float]:
    """One step of the R2M baseline (its Algorithm 1): rollout, rewards from the frozen RM's last-token state
    fused with the policy's hidden states, policy update on every valid response, then a GREBT step of the head
    on the updated policy's hidden states."""
    timer, settings = PhaseTimer(), cfg.reward
    omega = r2m_time_weight(step, cfg.total_steps, settings.r2m_min_weight)
    rm_pad, policy_pad = pad_id_of(run.reward_tokenizer), pad_id_of(run.policy_tokenizer)
    with timer.phase("rollout"):
        groups = sample_groups(run, cfg, step)
    metrics = {**rollout_metrics(groups), "r2m/omega": omega}
    if not groups.valid.any():
        counters["steps_skipped_no_valid_response"] += 1
        logger.warning("step %d: no valid response to score; step skipped", step)
        return finish_step(metrics, timer, counters)
    with timer.phase("score"):
        feedback = collect_feedback(run.reward_model, run.policy, groups, rm_pad, policy_pad,
                                    settings.micro_batch_size * cfg.rollout.sampling.n)
        scores = GroupScores(r2m_rewards(run.r2m_state.module, feedback, omega, groups.valid.shape), None)
    if non_finite_scores(scores, groups.valid):
        counters["steps_skipped_non_finite_scores"] += 1
        logger.warning("step %d: non-finite R2M rewards; step skipped", step)
        return finish_step(metrics, timer, counters)
    partition = partition_feedback("r2m", scores, groups.valid, 0.5)  # R2M trains on every valid response
    metrics |= feedback_metrics(groups, scores, partition, "filter")
    log_rollouts(run, cfg, step, groups, scores, partition)
    if run.policy_state is not None:
        metrics |= train_policy(run, cfg, groups, scores, partition, counters, timer, step)
    with timer.phase("rm_update"), run.offload.resident("r2m_head"):
        feedback.policy_hidden, feedback.policy_mask = policy_hidden_states(
            run.policy, groups, feedback.slots, policy_pad, settings.micro_batch_size * cfg.rollout.sampling.n)
        metrics |= update_r2m_head(run.r2m_state, feedback, groups.valid, omega, settings.r2m_alpha)
    return finish_step(metrics, timer, counters, completed=groups)


def train_policy(run: Stage3Run, cfg: Stage3Config, groups: RolloutGroups, scores: GroupScores,
                 partition: FeedbackPartition, counters: Counter, timer: PhaseTimer, step: int) -> dict[str, float]:
    """Algorithm 2, line 17 and the weight sync: advantages over the kept responses, old / reference log-probs,
    the policy update and the new weights into the rollout engine."""
    if not partition.kept.any():
        counters["policy_updates_skipped_nothing_kept"] += 1
        logger.warning("step %d: the filter kept no response; policy update skipped", step)
        return {}
    sampling = cfg.rollout.sampling
    with timer.phase("policy_logprobs"), run.offload.resident("reference"):
        advantages = token_advantages(cfg.policy.advantage, scores.rewards, partition.kept, groups.response_lengths)
        rows = policy_rows(groups.policy_prompt_ids, groups.policy_response_ids, partition.kept, advantages)
        mini_batches, metrics = policy_mini_batches(run.policy, run.reference, rows, cfg.policy,
                                                    pad_id_of(run.policy_tokenizer),
                                                    temperature=sampling.logit_temperature)
    with timer.phase("policy_update"), run.offload.resident("policy"):
        metrics |= update_policy(run.policy_state, mini_batches, cfg.policy, sampling.max_new_tokens,
                                 temperature=sampling.logit_temperature)
    with timer.phase("weight_sync"):
        run.sync_rollout_weights()
    return metrics


def _clear_dir(path: Path) -> None:
    """Collective: removes a final output a relaunch of a finished run writes again."""
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    torch.distributed.barrier()


def save_final_models(run: Stage3Run, cfg: Stage3Config) -> None:
    """The trained models as model checkpoints (convertible to HF with tools/convert_megatron_to_hf.py)."""
    for name, module, source in (("policy", run.policy, cfg.policy.checkpoint),
                                 ("reward_model", run.reward_model, cfg.reward.checkpoint)):
        if (name == "policy" and run.policy_state is None) or (name == "reward_model" and run.reward_state is None):
            continue
        meta, _ = read_checkpoint_meta(source)
        _clear_dir(Path(cfg.output_dir) / name)
        save_model_checkpoint(module, Path(cfg.output_dir) / name, meta, Path(source) / HF_SUBDIR)
    if run.r2m_state is not None:
        # R2M's trained part is its head (the reward model is unchanged): a training checkpoint of it.
        _clear_dir(Path(cfg.output_dir) / "r2m_head")
        save_train_checkpoint(run.r2m_state, Path(cfg.output_dir) / "r2m_head", cfg.total_steps)
    logger.info("stage 3 finished: %s", cfg.output_dir)


def main(argv: list[str]) -> None:
    """``torchrun ... -m megatron_save stage3 CONFIG.yaml [MORE.yaml ...] [key=value ...]``."""
    run_from_command_line(Stage3Config, train_stage3, "stage3", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
