"""torchrun worker (4 processes): token-budget micro-batches against fixed ones, at TP1 x DP4, TP2 x DP2 and
PP2 x DP2, with a budget smaller than one group's tokens (a group spans micro-batches):

- the reward-model update on rollouts of every strategy whose loss couples a group (SAVE with and without the
  curriculum, a value-only SAVE update, Mean Reward, HL-BT, the verifier control): its gradient cache against the
  fused fixed-micro-batch update;
- the GRPO policy update with two mini-batches (old and reference log-probs by token-budget forwards) and with one
  (its own forward gives the old log-probs and the pre-update entropy / KL).

``--break-cache``: the budget update uses each micro-batch's own loss on its rows in place of the cached
whole-group gradients (what the gradient cache exists to avoid); the test expects it to fail.

Writes {"<layout>-<case>": {"fixed": {...}, "budget": {...}, "param_rel_diff": x, "budget_tokens": n,
"group_tokens": m, "micro_batches": k}} to --out.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage3_worker import fixed_rollouts  # noqa: E402

from megatron_save.algorithms import token_advantages  # noqa: E402
from megatron_save.checkpoint import build_model_from_checkpoint  # noqa: E402
from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.data.token_budget import micro_batch_tokens  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402
from megatron_save.models.forward import forward_micro_batches  # noqa: E402
from megatron_save.trainers import losses  # noqa: E402
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state  # noqa: E402
from megatron_save.trainers.stage3 import reward_phase  # noqa: E402
from megatron_save.trainers.stage3.batches import policy_rows, response_slot_partition  # noqa: E402
from megatron_save.trainers.stage3.config import PolicySettings, RewardSettings  # noqa: E402
from megatron_save.trainers.stage3.groups import prepare_groups, score_groups  # noqa: E402
from megatron_save.trainers.stage3.policy_phase import policy_mini_batches, update_policy  # noqa: E402
from megatron_save.trainers.strategies import STRATEGIES  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
# Adam with eps = 1 and lr = 1: a first step of g / (|g| + 1), about the gradient itself, so the updated weights
# compare the gradients. At the default eps = 1e-8 the first step is lr x g / (|g| + eps): for an element whose
# gradient is near eps it amplifies the gradient's absolute rounding by lr / eps (1e5 at lr = 1e-3). Token-budget
# micro-batches group and pad the rows differently, so the gradients' sums over micro-batches round differently
# (about 1e-7 of their scale: losses and gradient norms agree within 2e-7), and such elements then move up to 1e-5
# apart (5e-4 of a tensor's largest weight, measured): a property of Adam's per-element scaling, not of the budget.
OPTIM = OptimizerSettings(lr=1.0, value_head_lr=1.0, adam_eps=1.0, decay_style="constant")
# case: (strategy, mu). mu = 0.5 keeps every response; 0.999 none (a value-only SAVE update); 0.6 a curriculum.
RM_CASES = {"save": ("save", 0.6), "save_no_curriculum": ("save_no_curriculum", 0.5),
            "save_value_only": ("save", 0.999), "mean_reward": ("mean_reward", 0.5), "hl_bt": ("hl_bt", 0.5),
            "verifier_hl_bt": ("verifier_hl_bt", 0.5)}


def _param_rel_diff(a, b) -> float:
    diff = 0.0
    for x, y in zip(a.parameters(), b.parameters()):
        diff = max(diff, ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item())
    stats = torch.tensor([diff])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return stats.item()


def _budget(groups) -> tuple[int, int]:
    """Twice the longest RM sequence (every row fits; a group of 4 spans micro-batches), and the smallest group's
    tokens (rows x its longest row)."""
    longest = max(len(s) for row in groups.rm_sequences for s in row)
    return 2 * longest, min(micro_batch_tokens([len(s) for s in row]) for row in groups.rm_sequences)


def rm_case(args, tokenizer, kind: str, threshold: float) -> dict:
    prompts, rollouts = fixed_rollouts(tokenizer)
    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=128, drop_truncated=False)
    budget, group_tokens = _budget(groups)
    grades = None
    if STRATEGIES[kind].verifier_grades:
        grades = torch.rand(groups.valid.shape, generator=torch.Generator().manual_seed(5))
    results, models = {}, {}
    for name, tokens, size in (("fixed", 0, 1), ("budget", budget, 1)):
        settings = RewardSettings(checkpoint=args.reward, strategy=kind, micro_batch_size=size,
                                  max_tokens_per_micro_batch=tokens,
                                  optim=OPTIM)
        model, _, _ = build_model_from_checkpoint(args.reward)
        state = build_train_state(model, settings.optim, total_steps=1)
        update = reward_phase.update_reward_model(state, STRATEGIES[kind], settings, groups, groups.valid,
                                                  threshold, 0, True, grades)
        valid = groups.valid
        results[name] = {**update.metrics, "reward_count": update.reward_count, "stepped": update.stepped,
                         "rewards": update.scores.rewards[valid].tolist(),
                         "values": update.scores.values.nan_to_num(0.0).tolist(),
                         "forwards": update.forwards, "backwards": update.backwards}
        models[name] = model
    count = len(response_slot_partition(groups, budget, _dp_size())[0])
    return {**results, "param_rel_diff": _param_rel_diff(models["budget"], models["fixed"]),
            "budget_tokens": budget, "group_tokens": group_tokens, "micro_batches": count}


def scoring_case(args, tokenizer) -> dict:
    """RM scoring (R and V of every valid response) in token-budget micro-batches against fixed ones."""
    prompts, rollouts = fixed_rollouts(tokenizer)
    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=128, drop_truncated=False)
    budget, _ = _budget(groups)
    model, _, _ = build_model_from_checkpoint(args.reward)
    results = {}
    for name, tokens in (("fixed", 0), ("budget", budget)):
        scores = score_groups(model, groups, 0, 4, tokens)
        results[name] = {"rewards": scores.rewards[groups.valid].tolist(), "values": scores.values.tolist()}
    return results


def shapes_case(args) -> dict:
    """Micro-batches of one length and different rows (as a budget's last, smaller bin) in one pipeline call,
    against each alone: under PP the stages must exchange each activation's shape, not only when lengths differ."""
    model, _, _ = build_model_from_checkpoint(args.reward)
    ids = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(5))
    parts = [ids[:3], ids[3:]]
    together = forward_micro_batches(model, parts)
    alone = [forward_micro_batches(model, [part]) for part in parts]
    diff = torch.zeros(())
    if together is not None:  # the last pipeline stage
        diff = max((t - a[0]).abs().max() for t, a in zip(together, alone))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return {"max_abs_diff": diff.item()}


def _dp_size() -> int:
    from megatron.core import parallel_state
    return parallel_state.get_data_parallel_world_size()


def policy_case(args, tokenizer, mini_batches: int) -> dict:
    prompts, rollouts = fixed_rollouts(tokenizer)
    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=128, drop_truncated=False)
    rewards = torch.randn(groups.valid.shape, generator=torch.Generator().manual_seed(3))
    kept = groups.valid.clone()
    kept[0, 0] = kept[1, 1] = kept[2, 3] = False  # rows that do not divide evenly over ranks: fillers
    advantages = token_advantages("grpo", rewards.masked_fill(~groups.valid, float("nan")), kept,
                                  groups.response_lengths)
    rows = policy_rows(groups.policy_prompt_ids, groups.policy_response_ids, kept, advantages)
    longest = max(len(s) for s in rows.sequences)
    budget = 2 * longest
    results, models = {}, {}
    for name, tokens in (("fixed", 0), ("budget", budget)):
        settings = PolicySettings(checkpoint=args.policy, micro_batch_size=2, mini_batches=mini_batches,
                                  kl_coef=0.1, max_tokens_per_micro_batch=tokens,
                                  optim=OPTIM)
        policy, _, _ = build_model_from_checkpoint(args.policy)
        reference, _, _ = build_model_from_checkpoint(args.policy)
        state = build_train_state(policy, settings.optim, total_steps=mini_batches)
        batches, pre, _ = policy_mini_batches(policy, reference, rows, settings, pad_id=0, temperature=0.7)
        metrics = update_policy(state, batches, settings, norm_constant=8.0, temperature=0.7)
        results[name] = {**pre, **metrics, "micro_batches": [len(m) for m in batches],
                         "widths": sorted({m.input_ids.shape[1] for part in batches for m in part})}
        models[name] = policy
    return {**results, "param_rel_diff": _param_rel_diff(models["budget"], models["fixed"]),
            "budget_tokens": budget, "longest": longest}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--break-cache", action="store_true")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names of LAYOUTS")
    args = parser.parse_args()
    if args.break_cache:
        cached = losses.group_loss_gradients

        def per_micro_batch(group_terms, rewards, values, trained, threshold, grades, value_loss_weight):
            # Each half of a group's gradient from that half alone, as a loss on micro-batches of half groups
            # would give (the logged terms stay the whole groups').
            terms, reward_grad, value_grad = cached(group_terms, rewards, values, trained, threshold, grades,
                                                    value_loss_weight)
            half = rewards.shape[1] // 2
            for cols in (slice(0, half), slice(half, None)):
                reward_grad[:, cols] = cached(group_terms, rewards[:, cols], values, trained[:, cols], threshold,
                                              None if grades is None else grades[:, cols], value_loss_weight)[1]
            return terms, reward_grad, value_grad

        reward_phase.group_loss_gradients = per_micro_batch
    init_distributed(ParallelConfig())
    tokenizer = AutoTokenizer.from_pretrained(Path(args.policy) / "hf")
    results = {}
    for layout in args.layouts.split(","):
        tp, pp = LAYOUTS[layout]
        set_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        for case, (kind, threshold) in RM_CASES.items():
            if args.break_cache and case != "save":
                continue
            results[f"{layout}-{case}"] = rm_case(args, tokenizer, kind, threshold)
        if not args.break_cache:
            results[f"{layout}-scoring"] = scoring_case(args, tokenizer)
            results[f"{layout}-shapes"] = shapes_case(args)
            results[f"{layout}-grpo"] = policy_case(args, tokenizer, mini_batches=2)
            results[f"{layout}-grpo_one_step"] = policy_case(args, tokenizer, mini_batches=1)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    main()
