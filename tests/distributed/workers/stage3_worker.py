"""torchrun worker (4 processes): stage 3's RM update (SAVE and HL-BT), re-score and policy update, and PRIME's
implicit-PRM update and policy update, on fixed rollout groups at TP1 x DP4, TP2 x DP2, PP2 x DP2 and TP2 x PP2 x
DP1, so data-parallel splitting and loss normalisation are checked along with tensor and pipeline parallelism.

Writes {"<layout>-<case>": {metric: value or list}} to --out.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import LAYOUTS, MOE_LAYOUTS  # noqa: E402

from megatron_save.checkpoint import build_model_from_checkpoint  # noqa: E402
from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.data.chat import encode_prompt  # noqa: E402
from megatron_save.data.prompts import Prompt  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402
from megatron_save.models.policy import sequence_logprobs  # noqa: E402
from megatron_save.rollout import Rollouts  # noqa: E402
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state  # noqa: E402
from megatron_save.algorithms import token_advantages  # noqa: E402
from megatron_save.trainers.stage3.batches import policy_rows  # noqa: E402
from megatron_save.trainers.stage3.config import PolicySettings, PrimeSettings, RewardSettings  # noqa: E402
from megatron_save.trainers.stage3.groups import partition_feedback, prepare_groups, score_groups  # noqa: E402
from megatron_save.trainers.stage3.policy_phase import policy_mini_batches, update_policy  # noqa: E402
from megatron_save.trainers.stage3.prime import (  # noqa: E402
    label_outcomes,
    prime_token_advantages,
    update_implicit_prm,
    with_process_rewards,
)
from megatron_save.trainers.stage3.reward_phase import update_reward_model  # noqa: E402
from megatron_save.trainers.strategies import STRATEGIES  # noqa: E402

PROMPTS, GROUP = 4, 4


def fixed_rollouts(tokenizer) -> tuple[list[Prompt], Rollouts]:
    """Deterministic groups: random printable tokens, some responses ending with EOS."""
    generator = torch.Generator().manual_seed(11)
    prompts = [Prompt([{"role": "user", "content": f"question {i}"}], []) for i in range(PROMPTS)]
    for prompt in prompts:
        prompt.ids = encode_prompt(tokenizer, prompt.messages)
    responses, truncated = [], []
    for i in range(PROMPTS):
        group, flags = [], []
        for j in range(GROUP):
            length = int(torch.randint(3, 9, (1,), generator=generator))
            tokens = torch.randint(4, 90, (length,), generator=generator).tolist()
            stops = (i + j) % 2 == 0
            group.append(tokens + [tokenizer.eos_token_id] if stops else tokens)
            flags.append(not stops)
        responses.append(group)
        truncated.append(flags)
    return prompts, Rollouts([p.ids for p in prompts], responses, truncated)


def run(args, tokenizer, strategy: str, mini_batches: int = 2, rm_updates: int = 1) -> dict:
    """The step's RM update (``rm_updates`` of them on the same groups; the last one's metrics), re-score and
    policy update."""
    prompts, rollouts = fixed_rollouts(tokenizer)
    policy, _, _ = build_model_from_checkpoint(args.policy)
    reference, _, _ = build_model_from_checkpoint(args.policy)
    reward_model, _, _ = build_model_from_checkpoint(args.reward)
    reward = RewardSettings(checkpoint=args.reward, strategy=strategy, micro_batch_size=1,
                            optim=OptimizerSettings(lr=1e-3, value_head_lr=1e-2, decay_style="constant"))
    policy_settings = PolicySettings(checkpoint=args.policy, micro_batch_size=1, mini_batches=mini_batches,
                                     kl_coef=0.1, optim=OptimizerSettings(lr=1e-3, decay_style="constant"))
    reward_state = build_train_state(reward_model, reward.optim, total_steps=rm_updates)
    policy_state = build_train_state(policy, policy_settings.optim, total_steps=2)

    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=128, drop_truncated=False)
    for _ in range(rm_updates):
        update = update_reward_model(reward_state, STRATEGIES[strategy], reward, groups, groups.valid,
                                     threshold=0.5, pad_id=0, value_head=True)
    rm_metrics = update.metrics
    partition = partition_feedback(STRATEGIES["save"], update.scores, groups.valid, threshold=0.5)
    rescored = score_groups(reward_model, groups, pad_id=0, micro_batch_size=4)
    kept = partition_feedback(STRATEGIES[strategy], rescored, groups.valid, threshold=0.5).kept.clone()
    kept[0, 0] = kept[1, 1] = kept[2, 3] = False  # 13 rows: mini-batches of 7 and 6, padded per data-parallel size
    advantages = token_advantages("grpo", rescored.rewards, kept, groups.response_lengths)
    rows = policy_rows(groups.policy_prompt_ids, groups.policy_response_ids, kept, advantages)
    # At a sampling temperature other than 1, so the vocabulary-parallel log-probs at T are compared across layouts.
    mini_batches, pre, _ = policy_mini_batches(policy, reference, rows, policy_settings, pad_id=0, temperature=0.7)
    policy_metrics = update_policy(policy_state, mini_batches, policy_settings, norm_constant=8.0, temperature=0.7)
    probe = mini_batches[0][0].input_ids  # this rank's first rows; compare the log-probs of row 0 of rank 0
    after = sequence_logprobs(policy, probe, probe.shape[0], temperature=0.7).logp[0]
    return {"kept_prompts": int(partition.prompt_keep.sum()), **rm_metrics, **pre, **policy_metrics,
            "rewards_after": rescored.rewards.nan_to_num(0.0).flatten().tolist(),
            "values_after": rescored.values.nan_to_num(0.0).tolist(), "logp_after": after.tolist()}


def run_prime(args, tokenizer) -> dict:
    """PRIME: outcome labels from the frozen RM, the PRM's token rewards and update (its reference shared with the
    policy's, as in a run), PRIME's advantages and the policy update."""
    prompts, rollouts = fixed_rollouts(tokenizer)
    policy, _, _ = build_model_from_checkpoint(args.policy)
    reference, _, _ = build_model_from_checkpoint(args.policy)
    prm, _, _ = build_model_from_checkpoint(args.policy)
    reward_model, _, _ = build_model_from_checkpoint(args.reward)
    settings = PrimeSettings(accuracy_low=0.0, micro_batch_size=1,
                             optim=OptimizerSettings(lr=1e-2, decay_style="constant"))
    policy_settings = PolicySettings(checkpoint=args.policy, micro_batch_size=1, mini_batches=2, kl_coef=0.1,
                                     advantage="rloo", optim=OptimizerSettings(lr=1e-3, decay_style="constant"))
    prm_state = build_train_state(prm, settings.optim, total_steps=1)
    policy_state = build_train_state(policy, policy_settings.optim, total_steps=2)
    strategy = STRATEGIES["prime"]

    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=128, drop_truncated=False)
    scores = score_groups(reward_model, groups, pad_id=0, micro_batch_size=4)
    scores.outcome = label_outcomes(settings, groups, scores.rewards, tokenizer, None)
    partition = partition_feedback(strategy, scores, groups.valid, threshold=0.5)
    trained = partition.kept & ~groups.truncated  # as reward.update_skips_truncated leaves them out
    process_rewards, prm_metrics = update_implicit_prm(prm_state, reference, strategy, settings, groups,
                                                       partition.kept, trained, scores.outcome.labels, pad_id=0)
    # A second call with nothing to train: its token rewards are the updated PRM's, compared across layouts below.
    recomputed, _ = update_implicit_prm(prm_state, reference, strategy, settings, groups, partition.kept,
                                        torch.zeros_like(trained), scores.outcome.labels, pad_id=0)
    scores = with_process_rewards(scores, process_rewards)
    advantages = prime_token_advantages(scores, partition, groups.response_lengths, settings)
    rows = policy_rows(groups.policy_prompt_ids, groups.policy_response_ids, partition.kept, advantages)
    mini_batches, pre, _ = policy_mini_batches(policy, reference, rows, policy_settings, pad_id=0, temperature=1.0)
    policy_metrics = update_policy(policy_state, mini_batches, policy_settings, norm_constant=8.0, temperature=1.0)
    return {"kept": int(partition.kept.sum()), "trained": int(trained.sum()), **prm_metrics, **pre,
            **policy_metrics, "labels": scores.outcome.labels.flatten().tolist(),
            "process_rewards": process_rewards.flatten().tolist(), "recomputed": recomputed.flatten().tolist(),
            "advantages": advantages.flatten().tolist()}


def _layouts(moe: bool) -> dict[str, ParallelConfig]:
    """LAYOUTS, or with ``moe`` the MoE layouts at TP=1 (MoE training at TP > 1 needs sequence parallelism)."""
    if not moe:
        return {name: ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
                for name, (tp, pp) in LAYOUTS.items()}
    return {name: ParallelConfig(pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)
            for name, (tp, pp, ep, etp) in MOE_LAYOUTS.items() if tp == 1}


def run_every_layout(run_layout) -> None:
    """The workers' main: for each layout of LAYOUTS (or with --moe the MoE layouts at TP=1),
    ``run_layout(args, tokenizer)`` -> {case: results}, written to --out as {"<layout>-<case>": results} by
    rank 0."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--moe", action="store_true", help="MoE checkpoints: SAVE's step at the MoE layouts")
    args = parser.parse_args()
    init_distributed(ParallelConfig())
    tokenizer = AutoTokenizer.from_pretrained(Path(args.policy) / "hf")
    results = {}
    for name, layout in _layouts(args.moe).items():
        set_model_parallel(layout)
        results |= {f"{name}-{case}": result for case, result in run_layout(args, tokenizer).items()}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutdown_distributed()


def run_layout(args, tokenizer) -> dict:
    if args.moe:
        # The tiny MoE reward model's V starts below every R (a value-only first update); the second update's
        # partition keeps prompts, so the reward loss and the load-balancing loss train the backbone.
        return {"save": run(args, tokenizer, "save", rm_updates=2)}
    return {"save": run(args, tokenizer, "save"), "hl_bt": run(args, tokenizer, "hl_bt"),
            # One optimizer step: old log-probs and the pre-update entropy / KL from the update's own forward.
            "save_one_step": run(args, tokenizer, "save", mini_batches=1), "prime": run_prime(args, tokenizer)}


def main() -> None:
    run_every_layout(run_layout)


if __name__ == "__main__":
    main()
