"""Stage 3: RL with an online, self-improving reward model (paper Algorithm 2), and every baseline of the paper
through ``reward.strategy`` (trainers/strategies.py) and ``policy.frozen``.

    torchrun --nproc-per-node N -m megatron_save stage3 CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_save.algorithms import token_advantages
from megatron_save.checkpoint.run_checkpoint import (
    check_run_settings,
    choose_resume_checkpoint,
    latest_checkpoint,
    load_run_checkpoint,
    remove_stale_staging,
    save_run_checkpoint,
)
from megatron_save.checkpoint.model_checkpoint import checkpoint_verification
from megatron_save.data.batching import pad_id_of
from megatron_save.trainers.common import check_settings, ensure_output_dir, progress, run_from_command_line
from megatron_save.trainers.memory_check import check_stage3_memory
from megatron_save.trainers.stage3.batches import policy_rows
from megatron_save.trainers.stage3.config import RESUMABLE_CHANGES, Stage3Config, check_stage3_config
from megatron_save.trainers.stage3.groups import (
    FeedbackPartition,
    GroupScores,
    RolloutGroups,
    filter_threshold,
    non_finite_scores,
    partition_feedback,
)
from megatron_save.trainers.stage3.metrics import (
    PolicyUpdateInputs,
    add_metrics,
    count_skip,
    feedback_metrics,
    finish_step,
    passes,
    rollout_metrics,
    step_summary,
    value_only_run_warning,
)
from megatron_save.trainers.stage3.policy_phase import old_logprobs_passes, policy_mini_batches, update_policy
from megatron_save.trainers.stage3.prime import prime_token_advantages
from megatron_save.trainers.stage3.reward_phase import probe_metrics, r2m_phase, reward_phase, update_on_rollouts
from megatron_save.trainers.stage3.rollout_phase import (
    ROLLOUT_LOG,
    log_rollouts,
    policy_reward_penalty,
    sample_dynamic,
    sample_groups,
    score_rollouts,
    scoring_passes,
)
from megatron_save.trainers.stage3.run import Stage3Run, build_stage3_run, save_final_models
from megatron_save.utils.logging import get_logger
from megatron_save.utils.metrics import MetricsWriter, PhaseTimer, truncate_history

logger = get_logger("trainers.stage3")


def train_stage3(cfg: Stage3Config) -> Path:
    check_stage3_config(cfg)
    check_settings(cfg)
    check_stage3_memory(cfg)
    settings = asdict(cfg)
    latest = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if latest is not None:
        check_run_settings(latest, settings, RESUMABLE_CHANGES)  # before minutes of model building
    run = build_stage3_run(cfg)
    ensure_output_dir(cfg.output_dir, resuming=latest is not None)
    remove_stale_staging(cfg.output_dir)
    checkpoint = choose_resume_checkpoint(cfg.output_dir, checkpoint_verification()) if cfg.resume else None
    if checkpoint is not None and checkpoint != latest:
        check_run_settings(checkpoint, settings, RESUMABLE_CHANGES)
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
        if saves_run_checkpoint(cfg, step, last):
            with run.offload.resident(*run.trained_states()):
                save_run_checkpoint(cfg.output_dir, step, run.trained_states(), dict(counters), cfg.keep_checkpoints,
                                    settings)
    bar.close()
    writer.close()
    warning = value_only_run_warning(run.strategy, counters, last)
    if warning is not None:
        logger.warning(warning)
    if last == cfg.total_steps:
        with run.offload.resident(*run.trained_states()):  # R2M's final checkpoint holds its optimizer
            save_final_models(run, cfg)
    else:
        logger.info("exit_after_steps=%d reached at step %d; launch again to resume", cfg.exit_after_steps, last)
    return Path(cfg.output_dir)


def saves_run_checkpoint(cfg: Stage3Config, step: int, last: int) -> bool:
    """Whether ``step`` of a launch that ends at step ``last`` writes a run checkpoint: at total_steps only with
    save_final_checkpoint (a finished run's final models need none), otherwise every save_every steps and at the
    end of a launch that stops before total_steps (exit_after_steps: the next launch resumes from it)."""
    if step == cfg.total_steps:
        return cfg.save_final_checkpoint
    return step == last or bool(cfg.save_every and step % cfg.save_every == 0)


def rl_step(run: Stage3Run, cfg: Stage3Config, step: int, counters: Counter) -> dict[str, float]:
    """One step of Algorithm 2: rollout, score, partition, RM update, re-score and filter, policy update (and R2M's
    head update after it). A strategy that updates on its own scores (SAVE, Mean Reward, HL-BT) scores,
    partitions and updates in one reward-model forward-backward."""
    timer, strategy = PhaseTimer(), run.strategy
    policy_groups = None  # dynamic sampling: [B] the groups the policy may train on
    with timer.phase("rollout"):
        if cfg.rollout.dynamic_sampling.enabled:
            sample = sample_dynamic(run, cfg, step, counters)
            groups, policy_groups = sample.groups, sample.policy_groups
        else:
            groups = sample_groups(run, cfg, step)
    metrics = rollout_metrics(groups)
    if policy_groups is not None:
        add_metrics(metrics, sample.metrics)
    if run.probe_pairs:
        with timer.phase("probe"):
            add_metrics(metrics, probe_metrics(run, cfg))
    threshold = filter_threshold(strategy, step, cfg.total_steps, cfg.reward.initial_margin)
    scored_by_sampling = policy_groups is not None and sample.scores is not None
    update = None
    if strategy.scores_in_update and groups.valid.any():
        update = update_on_rollouts(run, cfg, groups, threshold, timer)
        scores = update.scores
        add_metrics(metrics, passes("reward", forward=update.forwards, backward=update.backwards))
    elif scored_by_sampling:
        scores = sample.scores  # dynamic sampling scored them with the same reward model (its passes counted)
    else:
        with timer.phase("score"):
            scores = score_rollouts(run, cfg, groups, step)
    if scores is None or not groups.valid.any():
        count_skip(counters, "steps_skipped_no_valid_response", step, "no valid response to score; step skipped")
        return finish_step(metrics, timer, counters)
    if update is None and not scored_by_sampling:
        add_metrics(metrics, scoring_passes(run.strategy))
    if non_finite_scores(scores, groups.valid):
        count_skip(counters, "steps_skipped_non_finite_scores", step, "non-finite rewards; step skipped")
        return finish_step(metrics, timer, counters)
    partition = partition_feedback(strategy, scores, groups.valid, threshold)
    add_metrics(metrics, feedback_metrics(groups, scores, partition, "filter"))
    logged = (scores, partition)  # the rollout log shows the scores and filter before any RM update
    if strategy.update == "before_policy":
        scores, rm_metrics = reward_phase(run, cfg, step, groups, scores, partition, update, counters, timer)
        add_metrics(metrics, rm_metrics)
        if non_finite_scores(scores, groups.valid):
            count_skip(counters, "policy_updates_skipped_non_finite_scores", step,
                       "non-finite rewards after the RM update; policy update skipped")
            log_rollouts(run, cfg, step, groups, *logged, None)
            return finish_step(metrics, timer, counters)
        partition = partition_feedback(strategy, scores, groups.valid, threshold)
        add_metrics(metrics, feedback_metrics(groups, scores, partition, "filter_after_rm_update"))
    policy_update = None
    if run.policy_state is not None:
        policy_metrics, policy_update = policy_phase(run, cfg, step, groups, scores, partition, counters, timer,
                                                     policy_groups)
        add_metrics(metrics, policy_metrics)
    if strategy.update == "after_policy":
        add_metrics(metrics, r2m_phase(run, cfg, step, groups, scores, timer))
    log_rollouts(run, cfg, step, groups, *logged, policy_update)
    return finish_step(metrics, timer, counters, completed=groups)


def policy_phase(run: Stage3Run, cfg: Stage3Config, step: int, groups: RolloutGroups, scores: GroupScores,
                 partition: FeedbackPartition, counters: Counter, timer: PhaseTimer,
                 policy_groups: torch.Tensor | None = None) -> tuple[dict[str, float], PolicyUpdateInputs | None]:
    """Algorithm 2, line 17 and the weight sync: advantages over the kept responses (of the ``policy_groups`` [B]
    that dynamic sampling kept) from the rewards plus the overlong penalty, old / reference log-probs, the policy
    update and the new weights into the rollout engine. Returns its metrics and what it learned from (None when
    the filter kept nothing)."""
    kept = partition.kept if policy_groups is None else partition.kept & policy_groups[:, None]
    if not kept.any():
        count_skip(counters, "policy_updates_skipped_nothing_kept", step,
                   "the filter kept no response; policy update skipped")
        return {}, None
    temperature = cfg.rollout.sampling.logit_temperature
    penalty = policy_reward_penalty(cfg, groups)  # [B, G], 0 without reward.overlong_buffer
    rewards = scores.rewards + penalty  # the policy's reward: the reward model never sees the penalty
    correcting = cfg.policy.rollout_correction.enabled
    with timer.phase("policy_logprobs"), run.offload.resident("reference"):
        advantages = (prime_token_advantages(scores, partition, groups.response_lengths, cfg.reward.prime)
                      if scores.outcome is not None else
                      token_advantages(cfg.policy.advantage, rewards, kept, groups.response_lengths))
        rows = policy_rows(groups.policy_prompt_ids, groups.policy_response_ids, kept, advantages,
                           groups.rollout_logprobs if correcting else None)
        mini_batches, metrics, corrected = policy_mini_batches(
            run.policy, run.reference, rows, cfg.policy, pad_id_of(run.policy_tokenizer), temperature=temperature,
            record=cfg.rollout_log)
        outcome = scores.outcome
        shaped = bool(cfg.reward.overlong_buffer.length)
        inputs = PolicyUpdateInputs(rewards, kept, rows.advantages,
                                    None if outcome is None else outcome.labels,
                                    None if outcome is None else outcome.process_rewards,
                                    overlong_penalty=penalty if shaped else None, policy_groups=policy_groups,
                                    rollout_correction=corrected)
    if shaped:
        metrics["policy/overlong_penalty_mean"] = penalty[kept].mean().item()
    # The old log-probs' forward (none when the update's own forward gives them), then the update's (its
    # mini-batches make one pass).
    metrics |= passes("reference", forward=int(run.reference is not None))
    metrics |= passes("policy", forward=1 + old_logprobs_passes(mini_batches), backward=1)
    with timer.phase("policy_update"), run.offload.resident("policy"):
        metrics |= update_policy(run.policy_state, mini_batches, cfg.policy, cfg.rollout.sampling.max_new_tokens,
                                 temperature=temperature)
    with timer.phase("weight_sync"):
        run.sync_rollout_weights()
    return metrics, inputs


def main(argv: list[str]) -> None:
    """``torchrun ... -m megatron_save stage3 CONFIG.yaml [MORE.yaml ...] [key=value ...]``."""
    run_from_command_line(Stage3Config, train_stage3, "stage3", argv, check=check_stage3_config)
