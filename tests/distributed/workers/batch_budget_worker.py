"""torchrun worker (2 processes): one stage-1 (BT), stage-2 (value anchor) and SFT step with token-budget
micro-batches (``batch.max_tokens_per_micro_batch``) against the same step with fixed micro-batches, from the same
checkpoint and global batch, at DP=2 and at PP=2.

The budget is 1.99 x the global batch's longest pair (both rows, stage 1: two shorter pairs share a micro-batch) or
1.5 x its longest row (stage 2, SFT): every example fits, micro-batches hold different numbers of examples at different widths, and each is below a fixed
micro-batch's tokens (micro_batch_size x the global batch's longest row). SFT's fixed step has one micro-batch per
rank: at DP=1 its loss is the global batch's response-token mean, which a budget step's is at any DP. "stage1_unscaled" is the budget step with
every loss scale 1 (Megatron's plain mean of micro-batch means), which the test expects to differ.

Writes {"<layout>": {"<stage>": {"fixed": {...}, "budget": {...}, "param_rel_diff": x, "budget_tokens": n,
"fixed_tokens": m, "micro_batches": k, "widths": [...]}}} to --out.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_save.checkpoint import build_model_from_checkpoint  # noqa: E402
from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.data.chat import encode_prompt  # noqa: E402
from megatron_save.data.demonstrations import load_demonstrations  # noqa: E402
from megatron_save.data.preference import load_preference_pairs  # noqa: E402
from megatron_save.data.response_groups import ResponseGroup  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402
from megatron_save.trainers.common import BatchSettings, pair_micro_batches  # noqa: E402
from megatron_save.trainers.losses import bt_pair_loss, value_regression_loss  # noqa: E402
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state  # noqa: E402
from megatron_save.trainers.sft import demonstration_micro_batches, sft_loss  # noqa: E402
from megatron_save.trainers.stage2_value import prompt_micro_batches  # noqa: E402
from megatron_save.trainers.step import train_step  # noqa: E402
from workers.token_budget_worker import OPTIM, _param_rel_diff  # noqa: E402

LAYOUTS = {"dp2": (1, 1), "pp2": (1, 2)}
EXAMPLES = 8  # the global batch, of every stage
FIXED_MICRO_BATCH = 2


def _step(ckpt, make_batches, loss_fn, names, value_head_only, settings):
    model, _, _ = build_model_from_checkpoint(ckpt)
    state = build_train_state(model, OPTIM, total_steps=1, freeze_all_but_value_head=value_head_only)
    micro_batches = make_batches(settings)
    metrics = train_step(state, micro_batches, loss_fn, names)
    return model, metrics, micro_batches


def _case(ckpt, make_batches, loss_fn, names, value_head_only, longest, rows_per_example, unscaled=False,
          fixed_micro_batch=FIXED_MICRO_BATCH, budget_factor=1.5):
    fixed = BatchSettings(global_batch_size=EXAMPLES, micro_batch_size=fixed_micro_batch)
    budget = dataclasses.replace(fixed, max_tokens_per_micro_batch=int(budget_factor * rows_per_example * longest))
    fixed_model, fixed_metrics, _ = _step(ckpt, make_batches, loss_fn, names, value_head_only, fixed)
    make = make_batches
    if unscaled:
        make = lambda s: [dataclasses.replace(m, loss_scale=1.0) for m in make_batches(s)]  # noqa: E731
    budget_model, budget_metrics, micro_batches = _step(ckpt, make, loss_fn, names, value_head_only, budget)
    counts = torch.tensor([len(micro_batches)])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return {"fixed": fixed_metrics, "budget": budget_metrics,
            "param_rel_diff": _param_rel_diff(budget_model, fixed_model),
            "budget_tokens": budget.max_tokens_per_micro_batch,
            "fixed_tokens": fixed_micro_batch * rows_per_example * longest,
            "micro_batches": len(micro_batches), "max_micro_batches": int(counts.item()),
            "widths": sorted({m.input_ids.shape[1] for m in micro_batches}),
            "rows": [m.input_ids.shape[0] for m in micro_batches],
            "largest_micro_batch": max(m.input_ids.numel() for m in micro_batches)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reward", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--demonstrations", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(ParallelConfig())
    tokenizer = AutoTokenizer.from_pretrained(Path(args.reward) / "hf")
    pairs, _ = load_preference_pairs(args.pairs, tokenizer, max_length=128)
    pairs = pairs[:EXAMPLES]
    groups = [ResponseGroup(prompt_ids=encode_prompt(tokenizer, "prompt" + " word" * (3 * i % 7)), sequence_ids=[])
              for i in range(EXAMPLES)]
    targets = torch.linspace(-1.0, 2.0, EXAMPLES)
    demonstrations, _ = load_demonstrations(args.demonstrations, tokenizer, max_length=128)
    demonstrations = demonstrations[:EXAMPLES]
    indices = list(range(EXAMPLES))

    def stage1(s):
        return pair_micro_batches(pairs, indices, s, 0)

    def stage2(s):
        return prompt_micro_batches(groups, targets, indices, s, 0)

    def sft(s):
        return demonstration_micro_batches(demonstrations, indices, s, 0)

    results = {}
    for name, (tp, pp) in LAYOUTS.items():
        set_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        results[name] = {
            "stage1": _case(args.reward, stage1, bt_pair_loss, ("loss", "accuracy"), False,
                            max(p.length for p in pairs), 2, budget_factor=1.99),
            "stage2": _case(args.reward, stage2, value_regression_loss, ("loss",), True,
                            max(len(g.prompt_ids) for g in groups), 1),
            # One fixed micro-batch per rank: at DP=1 the global batch's token mean, which a budget's loss is.
            "sft": _case(args.policy, sft, sft_loss, ("loss",), False, max(len(d.ids) for d in demonstrations), 1,
                         fixed_micro_batch=EXAMPLES // (2 // (tp * pp))),
        }
        if name == "dp2":
            results[name]["stage1_unscaled"] = _case(args.reward, stage1, bt_pair_loss, ("loss", "accuracy"), False,
                                                     max(p.length for p in pairs), 2, unscaled=True,
                                                     budget_factor=1.99)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutdown_distributed()
