"""Benchmarks SAVE's batched losses against a per-prompt loop, and the cost of the value head in one forward.

    python tools/bench_save.py [--prompts 32 --group-size 16 --rounds 20] [--family llama --seq-len 256]

1. Forward + backward of save_partition + save_reward_loss + value_anchor_loss (eqs. 13-21) on [B, G] padded
   groups, against a Python loop over prompts computing the same losses on per-prompt slices. The two are
   checked equal (losses and gradients) before timing. Goal: loop / batched >= 20x.
2. One reward-model forward with the value head ([B, S, 2]) against one without it ([B, S, 1]), interleaved.
   Goal: the extra time is indistinguishable from zero, judged against the R-only model timed against itself.

Runs on CPU with torch's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

warnings.filterwarnings("ignore")  # Megatron's import-time deprecation noise would bury the results.

import torch  # noqa: E402

from megatron_save.algorithms import (  # noqa: E402
    curriculum_threshold,
    save_partition,
    save_reward_loss,
    value_anchor_loss,
)

Losses = tuple[torch.Tensor, torch.Tensor]


def make_groups(prompts: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random rewards [B, G] ~ N(0, 2^2), values [B] ~ N(0, 1) and a ragged valid mask (each group >= 1 response)."""
    generator = torch.Generator().manual_seed(seed)
    rewards = (2.0 * torch.randn(prompts, group_size, generator=generator)).requires_grad_()
    values = torch.randn(prompts, generator=generator).requires_grad_()
    lengths = torch.randint(group_size // 2, group_size + 1, (prompts,), generator=generator)
    valid = torch.arange(group_size)[None, :] < lengths[:, None]  # ragged groups ...
    valid &= torch.rand(prompts, group_size, generator=generator) > 0.1  # ... with filtered-out members too
    valid[:, 0] = True
    return rewards, values, valid


def batched_losses(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, mu: float) -> Losses:
    # The partition is a non-differentiable selection: it reads detached scores, as the trainer does.
    pos_mask, neg_mask, prompt_keep = save_partition(rewards.detach(), values.detach(), valid, mu)
    return save_reward_loss(rewards, values, pos_mask, neg_mask, prompt_keep), value_anchor_loss(values, rewards, valid)


def loop_losses(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, mu: float) -> Losses:
    """The straightforward reading of eqs. 13-21: one prompt at a time, on its valid responses only."""
    reward_terms, value_terms = [], []
    for i in range(rewards.shape[0]):
        r = rewards[i][valid[i]]  # [n_i]
        v = values[i].detach()  # stop-gradient anchor
        a = r.detach() - v
        kept = torch.sigmoid(a.abs()) >= mu
        pos, neg = r[kept & (a >= 0)], r[kept & (a < 0)]
        if pos.numel() > 0 and neg.numel() > 0:
            loss_pos = -torch.log(torch.exp(pos) / (torch.exp(v) + torch.exp(pos).sum())).mean()
            loss_neg = -torch.log(torch.exp(v) / (torch.exp(v) + torch.exp(neg).sum()))
            reward_terms.append(loss_pos + loss_neg)
        if r.numel() > 0:
            value_terms.append((values[i] - r.detach().mean()) ** 2)
    reward_loss = torch.stack(reward_terms).sum() / len(reward_terms) if reward_terms else rewards.sum() * 0.0
    return reward_loss, torch.stack(value_terms).mean()


def loss_and_grads(fn: Callable[..., Losses], rewards, values, valid, mu) -> tuple[Losses, tuple[torch.Tensor, ...]]:
    """Forward + backward; autograd.grad returns fresh gradients, so repeated calls do not accumulate."""
    reward_loss, value_loss = fn(rewards, values, valid, mu)
    grads = torch.autograd.grad(reward_loss + value_loss, (rewards, values))
    return (reward_loss.detach(), value_loss.detach()), grads


def time_interleaved(fns: list[Callable[[], object]], rounds: int, reps: int, warmup: int) -> list[list[float]]:
    """Seconds per call of each fn, one sample per round; the fns take turns within every round (order rotated),
    so samples of the same round saw the same machine load and can be compared pairwise."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for round_index in range(rounds):
        shift = round_index % len(fns)
        for k in order[shift:] + order[:shift]:
            start = time.perf_counter()
            for _ in range(reps):
                fns[k]()
            samples[k].append((time.perf_counter() - start) / reps)
    return samples


def paired_ratios(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th percentile) of the per-round ratios; pairing cancels load that drifts between rounds."""
    q1, median, q3 = statistics.quantiles([a / b for a, b in zip(numerator, denominator)], n=4)
    return q1, median, q3


def bench_losses(args: argparse.Namespace) -> None:
    mu = args.threshold if args.threshold is not None else curriculum_threshold(0, 320, 0.5)
    rewards, values, valid = make_groups(args.prompts, args.group_size, args.seed)
    loop_l, loop_g = loss_and_grads(loop_losses, rewards, values, valid, mu)
    batch_l, batch_g = loss_and_grads(batched_losses, rewards, values, valid, mu)
    # Benchmark two equal computations, or nothing.
    for name, a, b in zip(("reward loss", "value loss"), loop_l, batch_l):
        assert torch.allclose(a, b, rtol=1e-5, atol=0.0), f"{name}: loop {a.item()} != batched {b.item()}"
    for name, a, b in zip(("d/dR", "d/dV"), loop_g, batch_g):
        assert torch.allclose(a, b), f"{name} differs: max |diff| = {(a - b).abs().max().item():.3e}"

    kept = save_partition(rewards, values, valid, mu)[2].sum().item()
    print(f"[1] SAVE losses, forward + backward: B={args.prompts} G={args.group_size} mu={mu:.3f}, "
          f"{int(valid.sum())} valid responses, {kept} prompts kept; losses and gradients match")
    loop_s, batch_s = time_interleaved(
        [lambda: loss_and_grads(loop_losses, rewards, values, valid, mu),
         lambda: loss_and_grads(batched_losses, rewards, values, valid, mu)],
        rounds=args.rounds, reps=args.loss_reps, warmup=args.loss_reps,
    )
    q1, ratio, q3 = paired_ratios(loop_s, batch_s)
    print(f"    per-prompt loop: {statistics.median(loop_s) * 1e6:9.1f} us  (median of {args.rounds} rounds)")
    print(f"    batched:         {statistics.median(batch_s) * 1e6:9.1f} us")
    print(f"    speed-up loop/batched: {ratio:.1f}x  [IQR {q1:.1f}-{q3:.1f}x]  "
          f"(goal >= 20x: {'MET' if ratio >= 20 else 'NOT MET'})")


def build_reward_model(hf_config, value_head: bool, seed: int) -> torch.nn.Module:
    from megatron_save.models.builder import build_model

    torch.manual_seed(seed)  # same seed: both models get identical backbones and reward heads
    return build_model(hf_config, "reward_model", dtype="fp32", spec_backend="local", value_head=value_head).eval()


def bench_value_head(args: argparse.Namespace) -> None:
    from megatron_save.config import ParallelConfig
    from megatron_save.distributed import init_distributed, shutdown_distributed
    from megatron_save.testing import tiny_hf_config

    init_distributed(ParallelConfig())
    hf_config = tiny_hf_config(
        args.family, reward_model=True, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
    )
    # Only lengthen the rope window when needed: llama's default (16384) must stay above its rope scaling's.
    hf_config.max_position_embeddings = max(hf_config.max_position_embeddings, args.seq_len)
    r_only = build_reward_model(hf_config, value_head=False, seed=args.seed)
    r_and_v = build_reward_model(hf_config, value_head=True, seed=args.seed)
    input_ids = torch.randint(3, 100, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(args.seq_len).expand_as(input_ids)

    with torch.no_grad():
        out_r, out_rv = r_only(input_ids, position_ids, None), r_and_v(input_ids, position_ids, None)
        assert out_r.shape[-1] == 1 and out_rv.shape[-1] == 2
        assert torch.equal(out_r[..., 0], out_rv[..., 0]), "same seed should give the same rewards"
        # The R-only model twice (series A and A'): their ratio shows how far apart two equal things measure.
        r_s, rv_s, r_again_s = time_interleaved(
            [lambda: r_only(input_ids, position_ids, None), lambda: r_and_v(input_ids, position_ids, None),
             lambda: r_only(input_ids, position_ids, None)],
            rounds=args.forward_rounds, reps=1, warmup=3,
        )
        # The heads are the only code the two models do not share: timing them alone gives V's cost without
        # the backbone's noise.
        hidden = torch.randn(args.seq_len, args.batch_size, args.hidden_size)  # [S, B, H], as Megatron lays it out
        head_r, head_rv = time_interleaved([lambda: r_only.output_layer(hidden), lambda: r_and_v.output_layer(hidden)],
                                           rounds=args.forward_rounds, reps=50, warmup=50)
    shutdown_distributed()

    params = sum(p.numel() for p in r_only.parameters())
    v_q1, v_ratio, v_q3 = paired_ratios(rv_s, r_s)
    n_q1, n_ratio, n_q3 = paired_ratios(r_again_s, r_s)
    print(f"[2] reward-model forward, {args.family} {args.layers}x{args.hidden_size} ({params / 1e6:.2f}M params), "
          f"B={args.batch_size} S={args.seq_len}, {args.forward_rounds} interleaved rounds, no_grad, eval")
    print(f"    R only:  {statistics.median(r_s) * 1e3:8.2f} ms   R and V: {statistics.median(rv_s) * 1e3:8.2f} ms  "
          f"(medians)")
    print(f"    (R and V) / (R only): {v_ratio:.4f} ({(v_ratio - 1) * 100:+.2f}% for V)  [IQR {v_q1:.4f}-{v_q3:.4f}]")
    print(f"    noise, R only / R only: {n_ratio:.4f} ({(n_ratio - 1) * 100:+.2f}%)  [IQR {n_q1:.4f}-{n_q3:.4f}]")
    head_extra = statistics.median(head_rv) - statistics.median(head_r)
    print(f"    heads alone: R {statistics.median(head_r) * 1e6:.1f} us, R and V {statistics.median(head_rv) * 1e6:.1f} us"
          f" -> V adds {head_extra * 1e6:.1f} us = {head_extra / statistics.median(r_s) * 100:+.3f}% of the forward")
    inside = n_q1 <= v_ratio <= n_q3
    print(f"    goal: V's extra time indistinguishable from zero: {'MET' if inside else 'NOT MET'} "
          f"(V's ratio is {'inside' if inside else 'outside'} the self-vs-self IQR)")


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=None, help="mu; default curriculum_threshold(0, 320, 0.5)")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds for the losses")
    parser.add_argument("--loss-reps", type=int, default=20, help="calls per timing round for the losses")
    parser.add_argument("--family", default="llama", choices=("llama", "qwen2", "qwen3"))
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--forward-rounds", type=int, default=30, help="interleaved rounds for the forward")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--skip-forward", action="store_true", help="only benchmark the losses")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    bench_losses(args)
    if not args.skip_forward:
        bench_value_head(args)


if __name__ == "__main__":
    main()
