"""Times the reward-model update (SAVE) and the policy update (GRPO) with token-budget micro-batches against fixed
ones, on rollouts whose response lengths spread uniformly from 10% to 100% of the maximum.

    python tools/bench_token_budget.py [--layers 4 --hidden-size 256 --max-length 512 --group-size 16 --rounds 5]

Fixed micro-batches: ``--rm-prompts-per-micro-batch`` prompts (x G responses) for the RM update and
``--policy-micro-batch`` sequences for the policy update, every row padded to the batch's longest. The budgets
default to what those fixed micro-batches hold (rows x the longest row), so both sides have the same memory bound:
a budget packs short rows together (padding each micro-batch to its own longest row) and the RM update pays its
gradient cache's extra forward. Each round times both sides back to back, alternating which goes first, so that
samples of one round saw the same machine load; the ratios (budget / fixed) are per round, reported as the
median and the interquartile range. A ratio below 1: the budget is faster.

Runs in one process (world of 1, gloo) on CPU, or on one GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")  # Megatron's import-time deprecation noise would bury the results.

import torch  # noqa: E402


def rollout_groups(prompts: int, group_size: int, prompt_length: int, max_length: int, vocab: int, seed: int):
    """Synthetic groups: random prompt and response tokens, response lengths uniform in [10%, 100%] of
    ``max_length`` - ``prompt_length``, every response valid and trained."""
    from collections import Counter

    from megatron_save.trainers.stage3.groups import RolloutGroups

    generator = torch.Generator().manual_seed(seed)
    longest = max_length - prompt_length
    low = max(1, longest // 10)
    prompt_ids = [torch.randint(3, vocab, (prompt_length,), generator=generator).tolist() for _ in range(prompts)]
    responses = [[torch.randint(3, vocab, (int(torch.randint(low, longest + 1, (1,), generator=generator)),),
                                generator=generator).tolist() for _ in range(group_size)] for _ in range(prompts)]
    valid = torch.ones(prompts, group_size, dtype=torch.bool)
    return RolloutGroups(
        prompts=[[] for _ in range(prompts)], policy_prompt_ids=prompt_ids, policy_response_ids=responses,
        rm_prompt_lengths=[prompt_length] * prompts,
        rm_sequences=[[p + r for r in group] for p, group in zip(prompt_ids, responses)], valid=valid,
        truncated=torch.zeros_like(valid),
        response_lengths=torch.tensor([[len(r) for r in group] for group in responses]), skipped=Counter())


def padded_tokens(lengths: list[int], parts: list[list[int]]) -> int:
    """Tokens the forward runs over: each micro-batch's rows x its longest row."""
    return sum(len(part) * max(lengths[i] for i in part) for part in parts)


def paired(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th percentile) of the per-round ratios."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return q1, median, q3


def alternate(fns: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Seconds of each fn per round, the order reversed every other round; one untimed warm-up call each."""
    for fn in fns.values():
        fn()
    names = list(fns)
    samples = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2, help="prompts of the step")
    parser.add_argument("--group-size", type=int, default=16, help="G, responses per prompt")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512, help="prompt + longest response, in tokens")
    parser.add_argument("--rm-prompts-per-micro-batch", type=int, default=1, help="reward.micro_batch_size")
    parser.add_argument("--policy-micro-batch", type=int, default=8, help="policy.micro_batch_size")
    parser.add_argument("--rm-budget", type=int, default=0, help="reward.max_tokens_per_micro_batch (0: what a "
                        "fixed RM micro-batch holds)")
    parser.add_argument("--policy-budget", type=int, default=0, help="policy.max_tokens_per_micro_batch (0: what a "
                        "fixed policy micro-batch holds)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from megatron_save.config import ParallelConfig
    from megatron_save.data.token_budget import partition_by_tokens, min_micro_batches
    from megatron_save.distributed import init_distributed, shutdown_distributed
    from megatron_save.models.builder import build_model
    from megatron_save.testing import tiny_hf_config
    from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state
    from megatron_save.trainers.stage3.batches import policy_rows
    from megatron_save.trainers.stage3.config import PolicySettings, RewardSettings
    from megatron_save.trainers.stage3.policy_phase import policy_mini_batches, update_policy
    from megatron_save.trainers.stage3.reward_phase import update_reward_model
    from megatron_save.trainers.strategies import STRATEGIES

    init_distributed(ParallelConfig())
    shape = dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    rm_config = tiny_hf_config(args.family, reward_model=True, **shape)
    lm_config = tiny_hf_config(args.family, **shape)
    for config in (rm_config, lm_config):
        config.max_position_embeddings = max(config.max_position_embeddings, args.max_length)
    torch.manual_seed(args.seed)
    reward_model = build_model(rm_config, "reward_model", dtype="fp32", spec_backend="local", value_head=True)
    policy = build_model(lm_config, "causal_lm", dtype="fp32", spec_backend="local")
    optim = OptimizerSettings(lr=1e-7, value_head_lr=1e-6, decay_style="constant")
    reward_state = build_train_state(reward_model, optim, total_steps=10 * args.rounds)
    policy_state = build_train_state(policy, optim, total_steps=10 * args.rounds)

    groups = rollout_groups(args.prompts, args.group_size, args.prompt_length, args.max_length,
                            min(rm_config.vocab_size, lm_config.vocab_size), args.seed)
    rm_lengths = [len(s) for row in groups.rm_sequences for s in row]
    rm_fixed_rows = args.rm_prompts_per_micro_batch * args.group_size
    rm_budget = args.rm_budget or rm_fixed_rows * max(rm_lengths)
    generator = torch.Generator().manual_seed(args.seed + 1)
    advantages = torch.randn(args.prompts, args.group_size, 1, generator=generator).expand(
        -1, -1, args.max_length).contiguous()
    rows = policy_rows(groups.policy_prompt_ids, groups.policy_response_ids, groups.valid, advantages)
    policy_lengths = [len(s) for s in rows.sequences]
    policy_budget = args.policy_budget or args.policy_micro_batch * max(policy_lengths)

    rm_settings = {name: RewardSettings(checkpoint="-", micro_batch_size=args.rm_prompts_per_micro_batch,
                                        max_tokens_per_micro_batch=tokens)
                   for name, tokens in (("fixed", 0), ("budget", rm_budget))}
    policy_settings = {name: PolicySettings(checkpoint="-", micro_batch_size=args.policy_micro_batch,
                                            kl_coef=0.0, max_tokens_per_micro_batch=tokens)
                       for name, tokens in (("fixed", 0), ("budget", policy_budget))}

    def rm_update(name: str):
        update = update_reward_model(reward_state, STRATEGIES["save"], rm_settings[name], groups, groups.valid, 0.5,
                                     0, True)
        return update.metrics["rm/reward_loss"]

    def policy_update(name: str):
        mini_batches, _, _ = policy_mini_batches(policy, None, rows, policy_settings[name], 0, temperature=1.0)
        return update_policy(policy_state, mini_batches, policy_settings[name], float(args.max_length),
                             temperature=1.0)["policy/pg_loss"]

    rm = alternate({name: (lambda n=name: rm_update(n)) for name in ("fixed", "budget")}, args.rounds)
    pol = alternate({name: (lambda n=name: policy_update(n)) for name in ("fixed", "budget")}, args.rounds)
    shutdown_distributed()

    rm_count = min_micro_batches(rm_lengths, rm_budget, "reward.max_tokens_per_micro_batch")
    rm_parts = partition_by_tokens(rm_lengths, rm_budget, rm_count, "reward.max_tokens_per_micro_batch")
    rm_fixed_tokens = len(rm_lengths) * max(rm_lengths)
    policy_count = min_micro_batches(policy_lengths, policy_budget, "policy.max_tokens_per_micro_batch")
    policy_parts = partition_by_tokens(policy_lengths, policy_budget, policy_count,
                                       "policy.max_tokens_per_micro_batch")
    padded_policy = -(-len(policy_lengths) // args.policy_micro_batch) * args.policy_micro_batch
    params = sum(p.numel() for p in reward_model.parameters())
    device = "GPU" if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; one process")
    print(f"model: {args.family} {args.layers}x{args.hidden_size} ({params / 1e6:.2f}M params, RM with value head); "
          f"{args.prompts} prompts x G={args.group_size}, prompt {args.prompt_length} tokens, responses uniform in "
          f"[10%, 100%] of {args.max_length - args.prompt_length}: {sum(rm_lengths)} real tokens")
    print(f"rounds: {args.rounds}, fixed and budget alternating (order reversed every other round; shared, busy "
          "machine: the per-round ratio is the fair number)")
    for label, samples, fixed_desc, budget_desc in (
        ("RM update (SAVE)", rm,
         f"{len(rm_lengths) // rm_fixed_rows} micro-batches of {rm_fixed_rows} rows, {rm_fixed_tokens} padded tokens",
         f"budget {rm_budget}: {rm_count} micro-batches, {padded_tokens(rm_lengths, rm_parts)} padded tokens, "
         "2 forwards + 1 backward (gradient cache)"),
        ("policy update (GRPO)", pol,
         f"{padded_policy // args.policy_micro_batch} micro-batches of {args.policy_micro_batch} rows, "
         f"{padded_policy * max(policy_lengths)} padded tokens",
         f"budget {policy_budget}: {policy_count} micro-batches, {padded_tokens(policy_lengths, policy_parts)} "
         "padded tokens")):
        q1, ratio, q3 = paired(samples["budget"], samples["fixed"])
        print(f"[{label}]")
        print(f"    fixed:  {statistics.median(samples['fixed']):8.3f} s median  ({fixed_desc})")
        print(f"    budget: {statistics.median(samples['budget']):8.3f} s median  ({budget_desc})")
        print(f"    budget / fixed: {ratio:.3f}  [IQR {q1:.3f}-{q3:.3f}] over {args.rounds} rounds")


if __name__ == "__main__":
    main()
