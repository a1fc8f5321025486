"""Issue 39's algorithms in stage-3 SAVE runs at TP=2 on CPU, launched as a user would: CISPO with token TIS, DAPO's
overlong shaping and dynamic sampling (a run stopped after step 1 and resumed); GMPO with token rejection
sampling. Each step's rollouts.jsonl rows let the test recompute what the policy update used: the kept groups,
the penalties, the advantages, the IS weights and rejection masks."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
from helpers import REPO, length_parity_grade, read_metrics, run_stage3
from test_stage3_strategies import check_recorded_advantages

PROMPTS_PER_STEP, SEED, MAX_NEW_TOKENS = 4, 1234, 12  # examples/cpu/stage3_save.yaml and Stage3Config's seed


def _rollouts(out) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


def _user_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def _prompt_stream(prompts: list[str], index: int) -> list[str]:
    """Prompt batch ``index`` (1-based) of the seeded stream, transcribed from its documentation: epochs of a
    shuffle seeded with seed + epoch, cut into batches of prompts_per_step."""
    per_epoch = len(prompts) // PROMPTS_PER_STEP
    epoch, position = divmod(index - 1, per_epoch)
    order = list(range(len(prompts)))
    random.Random(SEED + epoch).shuffle(order)
    return [prompts[i] for i in order[position * PROMPTS_PER_STEP : (position + 1) * PROMPTS_PER_STEP]]


def _check_rollout_correction(rows: list[dict], record: dict, is_threshold: float | None,
                              rs_bounds: tuple[float, float] | None) -> None:
    """The IS weights and kept tokens each trained response recorded, recomputed from its recorded old and rollout
    log-probs (verl's token TIS and token RS), and the step's logged mismatch from the same values."""
    diffs, kept_tokens = [], 0
    for row in rows:
        update = row["policy_update"]
        for g, corrected in enumerate(update["rollout_correction"]):
            assert (corrected is None) == (not update["kept"][g])
            if corrected is None:
                continue
            assert len(corrected["rollout_logprobs"]) == row["response_lengths"][g]
            for old, rollout, weight, keep in zip(corrected["old_logprobs"], corrected["rollout_logprobs"],
                                                  corrected["is_weights"], corrected["keep"]):
                rho = math.exp(old - rollout)
                expected_keep = rs_bounds is None or rs_bounds[0] <= rho <= rs_bounds[1]
                assert keep == expected_keep
                expected = (min(rho, is_threshold) if is_threshold is not None else 1.0) if expected_keep else 0.0
                assert weight == pytest.approx(expected, rel=1e-5)
                diffs.append(old - rollout)
                kept_tokens += keep
    # The engine (HF, fp32) and the trainer (Megatron at TP=2, fp32) compute the same distribution.
    assert record["rollout_correction/abs_log_ratio"] == pytest.approx(sum(map(abs, diffs)) / len(diffs), rel=1e-4)
    assert 0 < record["rollout_correction/abs_log_ratio"] < 1e-3
    assert record["rollout_correction/kl_rollout_old_k1"] == pytest.approx(-sum(diffs) / len(diffs), abs=1e-7)
    assert record["rollout_correction/rejected_token_fraction"] == pytest.approx(1 - kept_tokens / len(diffs))


def _verifier_metric(row: dict) -> list[float]:
    return [length_parity_grade(_user_text(row["prompt"]), text)
            for text, valid in zip(row["responses"], row["valid"]) if valid]


def _reward_metric(row: dict) -> list[float]:
    """The logged scores (before any RM update; no overlong buffer in that run, so the policy's reward)."""
    return [r for r, valid in zip(row["rewards"], row["valid"]) if valid]


def _check_dynamic_sampling(rows: list[dict], record: dict, prompts: list[str], next_batch: int,
                            metric=_verifier_metric) -> int:
    """One step's generation batches (the stream's next ones), kept groups (spread in the metric, the first
    prompts_per_step) and dynamic_sampling/* metrics, recomputed from its rows; returns the stream's next batch."""
    batches = int(record["dynamic_sampling/generation_batches"])
    assert len(rows) == batches * PROMPTS_PER_STEP
    assert [_user_text(row["prompt"]) for row in rows] == [
        p for k in range(batches) for p in _prompt_stream(prompts, next_batch + k)]
    spread = []
    for row in rows:
        values = metric(row)
        spread.append(len(values) >= 2 and max(values) > min(values))
    expected_kept = [s and sum(spread[: b + 1]) <= PROMPTS_PER_STEP for b, s in enumerate(spread)]
    assert [row["policy_update"]["group_kept"] for row in rows] == expected_kept
    assert all(not any(row["policy_update"]["kept"]) for row, kept in zip(rows, expected_kept) if not kept)
    assert record["dynamic_sampling/groups_kept"] == sum(expected_kept)
    assert record["dynamic_sampling/dropped_fraction"] == pytest.approx(1 - sum(spread) / len(spread))
    assert record["dynamic_sampling/cap_reached"] == float(sum(spread) < PROMPTS_PER_STEP)
    return next_batch + batches


def _verifier_importable(monkeypatch) -> None:
    """The launched ranks import the verifier from tests/helpers.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))


DYNAMIC_SAMPLING = ["rollout.dynamic_sampling.enabled=true", "rollout.dynamic_sampling.metric=verifier",
                    "rollout.dynamic_sampling.max_generation_batches=3", "reward.verifier=helpers:length_parity_grade"]
COMMON = ["save_every=0", "save_final_checkpoint=false", "tensorboard=false", "rollout_log=true"]


def _prompts(rl_data) -> list[str]:
    return [_user_text(json.loads(line)["prompt"]) for line in rl_data["prompts"].read_text().splitlines()]


def test_cispo_tis_dynamic_sampling_and_overlong_shaping_at_tp2(tiny_models, rl_data, tmp_path, monkeypatch):
    """CISPO + token TIS (threshold 1: about half the tokens truncated) + overlong buffer + dynamic sampling by a
    verifier's grade. Step 1 in one launch, step 2 after a resume: the prompt stream continues where step 1's
    extra generation batches left it."""
    _verifier_importable(monkeypatch)
    out = tmp_path / "cispo"
    settings = ["total_steps=2", *COMMON, "policy.loss=cispo", "policy.clip_low=1.0", "policy.clip_high=0.28",
                "policy.rollout_correction.is_level=token", "policy.rollout_correction.is_threshold=1.0",
                "reward.overlong_buffer.length=4", "reward.overlong_buffer.penalty=0.5", *DYNAMIC_SAMPLING]
    models = (tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"])
    run_stage3(2, out, *models, *settings, "exit_after_steps=1")
    run_stage3(2, out, *models, *settings)
    records, rollouts = read_metrics(out), _rollouts(out)
    assert [r["step"] for r in records] == [1, 2]
    next_batch = 1
    for record in records:
        rows = [row for row in rollouts if row["step"] == record["step"]]
        next_batch = _check_dynamic_sampling(rows, record, _prompts(rl_data), next_batch)  # across the resume
        # The overlong penalty of each response, in the policy's reward only (the logged RM scores lack it).
        for row in rows:
            for length, penalty in zip(row["response_lengths"], row["policy_update"]["overlong_penalty"]):
                assert penalty == pytest.approx(-0.5 * max(0, length - (MAX_NEW_TOKENS - 4)) / 4)
        assert any(p < 0 for row in rows for p in row["policy_update"]["overlong_penalty"])
        _check_rollout_correction(rows, record, is_threshold=1.0, rs_bounds=None)
        assert 0.1 < record["rollout_correction/truncated_token_fraction"] < 0.9
        assert math.isfinite(record["policy/pg_loss"])
    check_recorded_advantages(rollouts, "grpo")


def test_gmpo_rejection_sampling_and_dynamic_sampling_at_tp2_dp2(tiny_models, rl_data, tmp_path, monkeypatch):
    """GMPO with token RS at [1, 2] (about half the tokens, pi_old below pi_rollout, leave the loss) and dynamic
    sampling, at TP=2 x DP=2: each data-parallel rank corrects its own rows, the log gathers them all."""
    _verifier_importable(monkeypatch)
    out = tmp_path / "gmpo"
    run_stage3(4, out, tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"],
               "total_steps=1", *COMMON, "policy.loss=gmpo", "policy.clip_low=0.4", "policy.clip_high=0.4",
               "policy.rollout_correction.rs=token", "policy.rollout_correction.rs_low=1.0",
               "policy.rollout_correction.rs_high=2.0", *DYNAMIC_SAMPLING)
    (record,), rollouts = read_metrics(out), _rollouts(out)
    _check_dynamic_sampling(rollouts, record, _prompts(rl_data), 1)
    _check_rollout_correction(rollouts, record, is_threshold=None, rs_bounds=(1.0, 2.0))
    assert 0.1 < record["rollout_correction/rejected_token_fraction"] < 0.9
    assert math.isfinite(record["policy/pg_loss"])
    check_recorded_advantages(rollouts, "grpo")


def test_dynamic_sampling_by_reward_scores_each_group_once(tiny_models, rl_data, tmp_path, world_of_one):
    """metric=reward with a frozen RM: the filter's scores are the step's scores (one RM forward, not two), and the
    kept groups are those with spread in the logged scores. In this process at TP=1."""
    from helpers import run_stage3_in_process

    out = tmp_path / "frozen"
    run_stage3_in_process(out, tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"],
                          "total_steps=1", *COMMON, "reward.strategy=frozen", "parallel.tensor_model_parallel_size=1",
                          "rollout.dynamic_sampling.enabled=true", "rollout.dynamic_sampling.metric=reward",
                          "rollout.dynamic_sampling.max_generation_batches=2")
    (record,), rollouts = read_metrics(out), _rollouts(out)
    _check_dynamic_sampling(rollouts, record, _prompts(rl_data), 1, metric=_reward_metric)
    assert record["passes/reward_forward"] == 1.0 and "passes/reward_backward" not in record
    assert "time/score_s" not in record  # no second scoring phase
    assert record["dynamic_sampling/groups_kept"] > 0 and math.isfinite(record["policy/pg_loss"])


def test_token_tis_with_megatron_rollouts_at_tp2(tiny_models, rl_data, tmp_path):
    """rollout.backend=megatron reports its behaviour log-probs from its own sampling steps at TP=2: the IS
    weights follow them, and the logged mismatch is that of incremental decoding against the trainer's forward
    (small, not zero)."""
    out = tmp_path / "megatron"
    run_stage3(2, out, tiny_models["llama-lm"]["mg"], tiny_models["llama-rmv"]["mg"], rl_data["prompts"],
               "total_steps=1", *COMMON, "rollout.backend=megatron", "policy.rollout_correction.is_level=token",
               "policy.rollout_correction.is_threshold=1.0")
    (record,), rollouts = read_metrics(out), _rollouts(out)
    _check_rollout_correction(rollouts, record, is_threshold=1.0, rs_bounds=None)
    assert 0.1 < record["rollout_correction/truncated_token_fraction"] < 0.9
    assert math.isfinite(record["policy/pg_loss"])
