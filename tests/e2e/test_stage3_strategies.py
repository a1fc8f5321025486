"""One or two stage-3 steps of every reward-model strategy and RL algorithm, and the degenerate steps, in this
process as a world of one (the parallel layouts are covered by test_stage3.py)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from helpers import REPO, read_metrics

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.config import load_config
from megatron_save.trainers.stage3 import Stage3Config, loop, reward_phase, rollout_phase
from megatron_save.trainers.stage3.run import build_stage3_run


def _config(tiny_models, rl_data, out, *overrides: str) -> Stage3Config:
    return load_config(Stage3Config, REPO / "examples" / "cpu" / "stage3_save.yaml", [
        f"output_dir={out}", f"train_data={rl_data['prompts']}", f"policy.checkpoint={tiny_models['llama-lm']['mg']}",
        f"reward.checkpoint={tiny_models['llama-rmv']['mg']}", "parallel.tensor_model_parallel_size=1",
        "total_steps=2", "save_every=0", "tensorboard=false", "rollout_log=true", *overrides])


VARIANTS = {
    "save_no_curriculum": ["reward.strategy=save_no_curriculum", "reward.update_skips_truncated=true"],
    "frozen_rm": ["reward.strategy=frozen"],
    "offline_bt": ["reward.strategy=offline_bt", "reward.offline_batch_size=8"],
    "mean_reward": ["reward.strategy=mean_reward"],
    "hl_bt": ["reward.strategy=hl_bt"],
    # HL-BT with each group's pair chosen by a verifier (a stand-in grading length parity), the RM probed each step.
    "verifier_hl_bt": ["reward.strategy=verifier_hl_bt", "reward.verifier=helpers:length_parity_grade"],
    # The oracle: the policy rewarded by the verifier's grades (the stand-in), the RM frozen and only probed.
    "verifier_reward": ["reward.strategy=verifier_reward", "reward.verifier=helpers:length_parity_grade"],
    # The policy update scored by the pre-update RM: no re-score.
    "lagged": ["reward.lagged_scores=true"],
    "frozen_policy": ["policy.frozen=true"],
    # With every offload on: R2M's head trains in its own resident window and its final checkpoint holds its
    # optimizer.
    "r2m": ["reward.strategy=r2m", "reward.r2m_width=16", "offload.optimizer=true", "offload.gradients=true",
            "offload.reference=true"],
    # PRIME with its accuracy filter opened (4 responses per prompt), the PRM at a tiny model's learning rate.
    "prime": ["reward.strategy=prime", "policy.advantage=rloo", "reward.prime.optim.lr=1e-3",
              "reward.prime.accuracy_low=0.0", "reward.prime.accuracy_high=1.0", "offload.gradients=true"],
    # PRIME's labels from a verifier (the gold testbed uses its gold reward; here a stand-in that grades the
    # parity of a response's length), its default accuracy filter and the double forward.
    "prime_verifier": ["reward.strategy=prime", "policy.advantage=rloo", "reward.prime.optim.lr=1e-3",
                       "reward.prime.labels=verifier", "reward.verifier=helpers:length_parity_grade",
                       "reward.prime.recompute_after_update=true"],
    "gspo": ["policy.loss=gspo", "policy.clip_low=3e-4", "policy.clip_high=4e-4"],
    "temperature": ["rollout.sampling.temperature=0.7"],
    "rloo": ["policy.advantage=rloo", "policy.mini_batches=2", "policy.micro_batch_size=2"],
    "dr_grpo": ["policy.advantage=dr_grpo", "policy.aggregation=seq-mean-token-sum-norm"],
    "reinforce_pp": ["policy.advantage=reinforce_pp", "policy.kl_coef=0"],
    "reinforce_pp_baseline": ["policy.advantage=reinforce_pp_baseline", "policy.dual_clip=3.0"],
}


# Full-batch passes of a complete step, by model: (forward, backward). An RM update on the rollouts is one
# forward-backward that also scores them, and the re-score another forward (none with lagged scores); continual
# offline BT scores, updates on static pairs and re-scores. The policy's update gives its own old log-probs with
# one mini-batch (two: a forward before it). PRIME's PRM scores, updates (and re-scores with the double
# forward), its reference shared with the policy's.
SAVE_PASSES = {"reward": (2, 1), "policy": (1, 1), "reference": (1, 0)}
PASSES = {"frozen_policy": {"reward": (2, 1)},
          "offline_bt": {**SAVE_PASSES, "reward": (3, 1)}, "lagged": {**SAVE_PASSES, "reward": (1, 1)},
          "rloo": {**SAVE_PASSES, "policy": (2, 1)},
          "frozen_rm": {**SAVE_PASSES, "reward": (1, 0), "reward_probe": (1, 0)},
          "verifier_hl_bt": {**SAVE_PASSES, "reward_probe": (1, 0)},
          "verifier_reward": {"policy": (1, 1), "reference": (1, 0), "reward_probe": (1, 0)},
          "reinforce_pp": {"reward": (2, 1), "policy": (1, 1)},  # kl_coef = 0: no reference
          "r2m": {"reward": (1, 0), "policy": (3, 1), "reference": (1, 0), "r2m_head": (2, 1)},
          "prime": {"reward": (1, 0), "prm": (2, 1), "policy": (1, 1), "reference": (2, 0)},
          "prime_verifier": {"reward": (1, 0), "prm": (3, 1), "policy": (1, 1), "reference": (2, 0)}}


# Variants run with reward.probe_data (the fixed pairs the RM is measured on at every step).
PROBED = ("frozen_rm", "verifier_hl_bt", "verifier_reward")


# The advantage estimator of each variant's policy update (GSPO keeps GRPO's advantages; the default is GRPO).
ESTIMATORS = {"rloo": "rloo", "dr_grpo": "dr_grpo", "reinforce_pp": "reinforce_pp",
              "reinforce_pp_baseline": "reinforce_pp_baseline", "prime": "prime", "prime_verifier": "prime",
              "frozen_policy": None}


def _whiten(values: list[float]) -> list[float]:
    """(x - mean) / sqrt(unbiased variance + 1e-8) over every token of the batch (REINFORCE++, PRIME's code)."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return [(v - mean) / math.sqrt(variance + 1e-8) for v in values]


def _group_advantage(estimator: str, rewards: list[float], i: int) -> float:
    """One response's advantage among its group's kept rewards, each estimator as its paper defines it: GRPO
    (Shao et al. 2024) (r_i - mean) / (std + eps) with the unbiased std and eps = 1e-6 (verl's); Dr. GRPO
    (Liu et al. 2025) r_i - mean; RLOO (Ahmadian et al. 2024) r_i - the mean of the others; REINFORCE++ with a
    group baseline (Hu 2025) r_i - mean, whitened over the batch later. A group of one has no baseline: 0."""
    n = len(rewards)
    if n < 2:
        return 0.0
    mean = sum(rewards) / n
    if estimator == "grpo":
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
        return (rewards[i] - mean) / (std + 1e-6)
    if estimator == "rloo":
        return rewards[i] - (sum(rewards) - rewards[i]) / (n - 1)
    return rewards[i] - mean  # dr_grpo, reinforce_pp_baseline


def _prime_returns(update: dict, lengths: list[int], coef: float = 5.0) -> list[list[float] | None]:
    """PRIME's released advantage (PRIME-RL/PRIME, training/verl/trainer/ppo/core_algos.py, compute_rloo_returns)
    for one group before whitening, at gamma = 1 and its coefficients 5 / 5: each token reward r becomes
    r K / (K - 1) - (sum of every response's mean token reward) / (K - 1), the outcome label o likewise on the last
    token, o K / (K - 1) - sum o / (K - 1); the advantage is the return-to-go of their weighted sum."""
    members = [g for g, kept in enumerate(update["kept"]) if kept]
    k = len(members)
    result: list[list[float] | None] = [None] * len(lengths)
    for i in members:
        result[i] = [0.0] * lengths[i]
    if k < 2:
        return result
    token_rewards = update["process_rewards"]
    mean_sum = sum(sum(token_rewards[g]) / lengths[g] for g in members)
    label_sum = sum(update["outcome_labels"][g] for g in members)
    for i in members:
        shaped = [coef * (r * k / (k - 1) - mean_sum / (k - 1)) for r in token_rewards[i]]
        shaped[-1] += coef * (update["outcome_labels"][i] * k / (k - 1) - label_sum / (k - 1))
        result[i] = [sum(shaped[t:]) for t in range(lengths[i])]
    return result


def recomputed_advantages(estimator: str, rows: list[dict]) -> list[list[list[float] | None]]:
    """[prompt][response] -> per-token advantages (None off the kept responses) of one step's rollout-log rows,
    from the rewards, kept mask and lengths the policy update recorded, by an independent transcription of each
    estimator."""
    result = []
    for row in rows:
        update, lengths = row["policy_update"], row["response_lengths"]
        if estimator == "prime":
            result.append(_prime_returns(update, lengths))
            continue
        members = [g for g, kept in enumerate(update["kept"]) if kept]
        rewards = [update["rewards"][g] for g in members]
        advantages: list[list[float] | None] = [None] * len(lengths)
        for position, g in enumerate(members):
            if estimator == "reinforce_pp":
                # The outcome reward on the last token, the return-to-go at gamma = 1 (no KL in the reward: the
                # KL term is in the loss): r_i on every token, whitened over the batch below.
                value = update["rewards"][g]
            else:
                value = _group_advantage(estimator, rewards, position)
            advantages[g] = [value] * lengths[g]
        result.append(advantages)
    if estimator in ("reinforce_pp", "reinforce_pp_baseline", "prime"):
        # Whitened over every response token of the batch (PRIME: of the groups with two kept responses or more).
        tokens = [(b, g) for b, row in enumerate(result) for g, values in enumerate(row) if values is not None
                  and (estimator != "prime" or sum(rows[b]["policy_update"]["kept"]) >= 2)]
        whitened = iter(_whiten([v for b, g in tokens for v in result[b][g]]))
        for b, g in tokens:
            result[b][g] = [next(whitened) for _ in result[b][g]]
    return result


def verifier_pair_loss(rows: list[dict]) -> float:
    """verifier_hl_bt's reward loss of a step, transcribed: per prompt, the first valid response with the highest
    grade (helpers.length_parity_grade of the logged text) against the first with the lowest, where the grades
    differ; the mean of -log sigmoid(R_best - R_worst) over those pairs, R the logged pre-update rewards."""
    from helpers import length_parity_grade

    losses = []
    for row in rows:
        graded = [(length_parity_grade("", text), reward) for text, reward, valid in
                  zip(row["responses"], row["rewards"], row["valid"]) if valid]
        best = max(graded, key=lambda pair: pair[0])
        worst = min(graded, key=lambda pair: pair[0])
        if best[0] > worst[0]:
            losses.append(math.log1p(math.exp(-(best[1] - worst[1]))))
    return sum(losses) / len(losses)


def check_recorded_advantages(rollouts: list[dict], estimator: str | None) -> None:
    """Each step's advantages, recomputed from the rollout log's record of the policy update (rewards, kept,
    lengths; PRIME: labels and token rewards), equal the ones the update was handed."""
    for step in sorted({row["step"] for row in rollouts}):
        rows = [row for row in rollouts if row["step"] == step]
        if estimator is None:
            assert all(row["policy_update"] is None for row in rows)
            continue
        expected = recomputed_advantages(estimator, rows)
        for b, row in enumerate(rows):
            recorded = row["policy_update"]["advantages"]
            for g, values in enumerate(recorded):
                assert (values is None) == (not row["policy_update"]["kept"][g]), (step, b, g)
                if values is not None:
                    assert len(values) == row["response_lengths"][g]
                    assert values == pytest.approx(expected[b][g], rel=1e-5, abs=1e-5), (step, b, g)
        assert any(any(v != 0 for v in values or ()) for row in rows for values in row["policy_update"]["advantages"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_strategy_and_algorithm_runs(variant, tiny_models, rl_data, tmp_path, world_of_one):
    overrides = VARIANTS[variant]
    if variant == "offline_bt":
        overrides = [*overrides, f"reward.offline_data={rl_data['pairs']}"]
    if variant in PROBED:
        overrides = [*overrides, f"reward.probe_data={rl_data['pairs']}"]
    out = loop.train_stage3(_config(tiny_models, rl_data, tmp_path / variant, *overrides))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    trains_rm = variant not in ("frozen_rm", "verifier_reward")
    trains_policy = variant != "frozen_policy"
    # R2M trains only its head, PRIME its implicit PRM.
    prime = variant.startswith("prime")
    assert (out / "reward_model").exists() == (trains_rm and variant != "r2m" and not prime)
    assert (out / "prm").exists() == (out / "checkpoints" / "step_000002" / "prm").exists() == prime
    assert (out / "checkpoints" / "step_000002" / "r2m_head").exists() == (variant == "r2m")
    assert (out / "policy").exists() == trains_policy
    for record in records:
        losses = {k: v for k, v in record.items() if k.startswith(("rm/", "policy/")) and "loss" in k}
        assert all(v is not None and math.isfinite(v) for v in losses.values()), losses
        assert any(k.startswith("rm/") for k in record) == trains_rm
        assert ("policy/pg_loss" in record) == trains_policy
        counted = {k.split("/")[1].rsplit("_", 1)[0] for k in record if k.startswith("passes/")}
        expected = PASSES.get(variant, SAVE_PASSES)
        assert counted == set(expected), counted
        for model, (forward, backward) in expected.items():
            assert (record.get(f"passes/{model}_forward"), record.get(f"passes/{model}_backward", 0)) == (
                forward, backward), (record["step"], model)
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1] * 4 + [2] * 4  # prompts_per_step = 4
    for row in rollouts:
        assert len(row["responses"]) == len(row["rewards"]) == len(row["kept"]) == 4
        assert all((reward is not None) == valid for reward, valid in zip(row["rewards"], row["valid"]))
        assert not any(kept and not valid for kept, valid in zip(row["kept"], row["valid"]))
        assert (row["value"] is not None) == (variant not in ("r2m", "verifier_reward") and any(row["valid"]))
    if variant == "offline_bt":
        assert records[0]["rm/bt_loss"] > 0
    if variant == "r2m":
        assert records[0]["r2m/omega"] == 0.6  # max(cos(pi / 2) / 2 + 1/2, Omega = 0.6)
        assert all(r["rm/grebt_loss"] > 0 for r in records)
    if prime:
        for record in records:
            assert record["prm/loss"] > 0 and 0 <= record["prm/accuracy"] <= 1 and record["prm/update_skipped"] == 0
            kept = sum(sum(row["kept"]) for row in rollouts if row["step"] == record["step"])
            assert record["prm/trained_responses"] == kept > 0
    check_recorded_advantages(rollouts, ESTIMATORS.get(variant, "grpo"))
    if variant == "verifier_reward":  # the oracle's rewards are the verifier's grades of the logged responses
        from helpers import length_parity_grade
        for row in rollouts:
            grades = [length_parity_grade("", text) if valid else None
                      for text, valid in zip(row["responses"], row["valid"])]
            assert row["rewards"] == row["policy_update"]["rewards"] == grades
    if variant in ("frozen_rm", "lagged", "verifier_reward"):  # no re-score: the policy learned from the first
        assert all(row["policy_update"]["rewards"] == row["rewards"] for row in rollouts)
    for record in records:  # an RM step on its reward loss changes R: the policy learned from the re-score
        learned = record.get("rm/reward_loss", 0) > 0 or record.get("rm/bt_loss", 0) > 0
        if learned and trains_policy and variant != "lagged":
            rows = [row for row in rollouts if row["step"] == record["step"]]
            assert any(row["policy_update"]["rewards"] != row["rewards"] for row in rows), record["step"]
    if variant in ("hl_bt", "mean_reward", "verifier_hl_bt"):
        assert any(r["rm/reward_loss"] > 0 for r in records)
    if variant == "verifier_hl_bt":
        for record in records:
            rows = [row for row in rollouts if row["step"] == record["step"]]
            assert record["rm/reward_loss"] == pytest.approx(verifier_pair_loss(rows), rel=1e-5)
    if variant in PROBED:
        assert all(0 <= r["rm_probe/accuracy"] <= 1 for r in records)
    if variant in ("frozen_rm", "verifier_reward"):  # the probe measures the RM itself: unchanged when frozen
        assert records[0]["rm_probe/accuracy"] == records[1]["rm_probe/accuracy"]
    if variant == "temperature":
        # One optimizer step per rollout batch: its log-probs are the old ones, if both are taken at T = 0.7.
        assert all(abs(r["policy/approx_kl"]) < 1e-6 and r["policy/clip_fraction"] == 0 for r in records)
    if variant == "save_no_curriculum":
        assert all(r["filter/threshold_mu"] == 0.5 and r["filter/keep_rate"] == 1.0 for r in records)
        assert sum(r["rm/truncated_left_out"] for r in records) > 0  # reward.update_skips_truncated
    elif trains_rm and variant != "r2m":
        assert all(r["rm/truncated_left_out"] == 0 for r in records)
    assert all(("prm/loss" in r) == prime for r in records)


ALGORITHM_EXAMPLES = ["grpo.yaml", "dr_grpo.yaml", "rloo.yaml", "reinforce_pp.yaml", "gspo.yaml"]


@pytest.mark.parametrize("example", ALGORITHM_EXAMPLES)
def test_algorithm_examples_run(example, tiny_models, rl_data, tmp_path, world_of_one):
    """Each examples/algorithms overlay as README shows it, on the CPU stage-3 config: one step, whose recorded
    advantages are the overlay's estimator's."""
    overrides = [f"output_dir={tmp_path}", f"train_data={rl_data['prompts']}",
                 f"policy.checkpoint={tiny_models['llama-lm']['mg']}",
                 f"reward.checkpoint={tiny_models['llama-rmv']['mg']}", "parallel.tensor_model_parallel_size=1",
                 "total_steps=1", "save_every=0", "tensorboard=false", "rollout_log=true"]
    cfg = load_config(Stage3Config, [REPO / "examples" / "cpu" / "stage3_save.yaml",
                                     REPO / "examples" / "algorithms" / example], overrides)
    out = loop.train_stage3(cfg)
    assert math.isfinite(read_metrics(out)[0]["policy/pg_loss"])
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    check_recorded_advantages(rollouts, cfg.policy.advantage)


def test_non_finite_rewards_skip_the_step(tiny_models, rl_data, tmp_path, world_of_one, monkeypatch):
    """A NaN in the first scoring (the fused RM update's own forward) skips step 1 without an RM step; an inf in
    step 2's re-scoring (after the RM update) skips its policy update only; step 3 runs whole. Both counted."""
    real_gather, real_score_groups = reward_phase.gather_rollout_outputs, rollout_phase.score_groups
    updates, rescores = [], []

    def update_scores_with_a_nan(*args, **kwargs):
        scores, sums = real_gather(*args, **kwargs)
        updates.append(1)
        if len(updates) == 1:
            scores.rewards[0, 1] = float("nan")
        return scores, sums

    def rescore_with_an_inf(*args, **kwargs):
        scores = real_score_groups(*args, **kwargs)
        rescores.append(1)
        if len(rescores) == 1:  # step 2's re-score (step 1 stopped before its own)
            scores.rewards[1, 0] = float("inf")
        return scores

    monkeypatch.setattr(reward_phase, "gather_rollout_outputs", update_scores_with_a_nan)
    monkeypatch.setattr(rollout_phase, "score_groups", rescore_with_an_inf)
    out = loop.train_stage3(_config(tiny_models, rl_data, tmp_path / "nan", "total_steps=3"))
    first, second, third = read_metrics(out)
    assert first["counters/steps_skipped_non_finite_scores"] == 1
    assert not any(k.startswith(("rm/", "policy/")) for k in first)
    assert math.isfinite(second["rm/value_loss"]) and "policy/pg_loss" not in second
    assert second["counters/policy_updates_skipped_non_finite_scores"] == 1
    assert third["counters/steps_skipped_non_finite_scores"] == 1
    assert math.isfinite(third["rm/value_loss"]) and math.isfinite(third["policy/pg_loss"])


def test_every_prompt_filtered_gives_a_value_only_update(tiny_models, rl_data, tmp_path, world_of_one):
    # m0 = 1 with a long horizon: mu(1) is about 1, so no response passes the filter.
    cfg = _config(tiny_models, rl_data, tmp_path / "filtered", "total_steps=1000", "reward.initial_margin=1.0")
    run = build_stage3_run(cfg)
    run.sync_rollout_weights()
    before = {name: param.detach().clone() for name, param in run.reward_model.named_parameters()}
    counters = Counter()
    record = loop.rl_step(run, cfg, 1, counters)
    assert record["filter/keep_rate"] == 0.0 and record["filter/kept_prompts_fraction"] == 0.0
    assert record["counters/value_only_rm_updates"] == 1
    assert record["rm/reward_loss"] == 0.0 and record["rm/value_loss"] > 0
    assert record["counters/policy_updates_skipped_nothing_kept"] == 1
    assert "policy/pg_loss" not in record
    for name, param in run.reward_model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == ("value_head" in name), name  # only the value head moved
    # The next step runs at the scheduled learning rates again.
    assert all(group["lr"] > 0 for group in run.reward_state.optimizer.param_groups)


@pytest.mark.parametrize("strategy", ["save", "hl_bt", "r2m"])
def test_a_step_without_any_valid_response_is_skipped(strategy, tiny_models, rl_data, tmp_path, world_of_one):
    # Every conversation is longer than 5 RM tokens: nothing can be scored.
    cfg = _config(tiny_models, rl_data, tmp_path / strategy, f"reward.strategy={strategy}", "reward.max_length=5",
                  "reward.r2m_width=8")
    run = build_stage3_run(cfg)
    run.sync_rollout_weights()
    record = loop.rl_step(run, cfg, 1, Counter())
    assert record["rollout/valid_fraction"] == 0.0
    assert record["counters/steps_skipped_no_valid_response"] == 1
    assert not any(name.startswith(("rm/", "policy/", "passes/")) for name in record)  # no pass, no update


def test_refuses_a_save_run_without_a_value_head(tiny_models, rl_data, tmp_path, world_of_one):
    cfg = _config(tiny_models, rl_data, tmp_path / "novalue", f"reward.checkpoint={tiny_models['llama-rm']['mg']}")
    with pytest.raises(ValueError, match="reward.strategy=save needs a value head"):
        loop.train_stage3(cfg)


def test_refuses_an_unknown_strategy(tiny_models, rl_data, tmp_path):
    with pytest.raises(ValueError, match="reward.strategy='r2d2' is not one of"):
        loop.train_stage3(_config(tiny_models, rl_data, tmp_path / "x", "reward.strategy=r2d2"))


def test_policy_weights_reach_the_rollout_engine(tiny_models, rl_data, tmp_path, world_of_one):
    cfg = _config(tiny_models, rl_data, tmp_path / "sync", "total_steps=1")
    run = build_stage3_run(cfg)
    run.sync_rollout_weights()
    engine_weights = dict(run.engine.model.named_parameters())
    with torch.no_grad():
        run.policy.decoder.final_layernorm.weight.add_(1.0)
    run.sync_rollout_weights()
    assert torch.equal(engine_weights["model.norm.weight"], run.policy.decoder.final_layernorm.weight)


PRIME = ("policy.advantage=rloo", "reward.prime.optim.lr=1e-3", "reward.prime.accuracy_low=0.0",
         "reward.prime.accuracy_high=1.0")
RESUMED_MODELS = {"save": ("policy", "reward_model"), "r2m": ("policy",), "prime": ("policy", "prm")}


@pytest.mark.parametrize("strategy", ["save", "r2m", "prime"])
def test_a_bf16_run_resumes_to_the_uninterrupted_parameters(strategy, tiny_models, rl_data, tmp_path, world_of_one):
    """bf16 policy and reward model (Megatron's mixed-precision optimizer with fp32 main copies): the run checkpoint
    holds both optimizers (and R2M's head, or PRIME's implicit PRM with its optimizer), and a resumed run ends
    where the uninterrupted one does."""
    from megatron_save.checkpoint.convert import convert_hf_to_megatron

    policy = tmp_path / "policy_bf16"
    reward = tmp_path / "reward_bf16"
    convert_hf_to_megatron(tiny_models["llama-lm"]["hf"], policy, dtype="bf16")
    convert_hf_to_megatron(tiny_models["llama-rmv"]["hf"], reward, dtype="bf16")
    common = (f"policy.checkpoint={policy}", f"reward.checkpoint={reward}", f"reward.strategy={strategy}",
              "reward.r2m_width=8", "save_every=1", *(PRIME if strategy == "prime" else ()))
    straight = loop.train_stage3(_config(tiny_models, rl_data, tmp_path / "straight", *common))
    # The interrupted run offloads idle state between phases (its checkpoint is written from there); the
    # uninterrupted one does not.
    resumed, offload = tmp_path / "resumed", ("offload.optimizer=true", "offload.gradients=true",
                                              "offload.reference=true")
    loop.train_stage3(_config(tiny_models, rl_data, resumed, *common, *offload, "exit_after_steps=1"))
    assert not (resumed / "policy").exists()
    if strategy == "save":  # a relaunch with other settings would mix two runs: refused, naming the change
        with pytest.raises(ValueError, match=r"other settings.*policy\.kl_coef: 0\.04 -> 0\.02"):
            loop.train_stage3(_config(tiny_models, rl_data, resumed, *common, "policy.kl_coef=0.02"))
    loop.train_stage3(_config(tiny_models, rl_data, resumed, *common, *offload))
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2]
    for model in RESUMED_MODELS[strategy]:
        before = {n: p.detach().clone() for n, p in build_model_from_checkpoint(straight / model)[0].named_parameters()}
        after = dict(build_model_from_checkpoint(resumed / model)[0].named_parameters())
        assert {p.dtype for p in before.values()} == {torch.bfloat16}
        for name, value in before.items():
            assert torch.equal(value, after[name]), f"{model}: {name} differs after resume"
    assert read_metrics(straight)[-1]["policy/pg_loss"] == read_metrics(resumed)[-1]["policy/pg_loss"]


@pytest.fixture
def group_mean_without_curriculum():
    """A strategy that is not in the paper, added as one row: SAVE's contrastive loss against the group mean,
    without the curriculum filter."""
    from megatron_save.trainers.losses import ROLLOUT_LOSS_OUTPUTS, mean_reward_rm_loss
    from megatron_save.trainers.strategies import STRATEGIES, RMStrategy, register_strategy

    row = register_strategy(RMStrategy(
        "mean_reward_no_curriculum", anchor="group_mean", curriculum=False, trains_backbone=True, value_head=False,
        learns_from="rollouts", update="before_policy", loss=mean_reward_rm_loss,
        loss_metrics=ROLLOUT_LOSS_OUTPUTS))
    yield row
    del STRATEGIES[row.name]


def test_a_registered_row_is_a_runnable_strategy(group_mean_without_curriculum, tiny_models, rl_data, tmp_path,
                                                 world_of_one):
    name = group_mean_without_curriculum.name
    out = loop.train_stage3(_config(tiny_models, rl_data, tmp_path / name, f"reward.strategy={name}"))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    # No curriculum: mu = 1/2 keeps every valid response; the group mean anchors the partition.
    assert all(r["filter/threshold_mu"] == 0.5 and r["filter/keep_rate"] == 1.0 for r in records)
    assert all("filter/anchor_bias" in r and "rm/value_loss" not in r for r in records)
    assert any(r["rm/reward_loss"] > 0 for r in records)
    initial = dict(build_model_from_checkpoint(tiny_models["llama-rmv"]["mg"])[0].named_parameters())
    trained = dict(build_model_from_checkpoint(out / "reward_model")[0].named_parameters())
    assert any(not torch.equal(initial[n], trained[n]) for n in trained if "value_head" not in n)
