"""torchrun worker (2 processes): the policy update, a stage-1 (BT) step and the fused SAVE reward-model step with
each activation-recompute setting, at TP=2 and at PP=2, against the same step without recompute.

For every (layout, case, part) it writes the step's metrics, the largest relative difference of the updated
parameters from the run without recompute (over all ranks), and how often each transformer layer of every rank, and
each layer's core attention, ran forward during the training step (hooks), so that a recompute setting that Megatron
silently ignored is seen: recomputing runs a module's forward again in the backward.

Writes {"<layout>": {"<case>": {"<part>": {...}}}} to --out. Then each --stage3 (a JSON list of key=value overrides
of examples/cpu/stage3_save.yaml) runs as a whole stage-3 run in the same launch (one start-up for everything),
recording the recompute granularity of every model it builds under "stage3_models".
"""

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import STAGE3_CPU_CONFIG  # noqa: E402
from stage3_worker import fixed_rollouts  # noqa: E402

from megatron_save.algorithms import token_advantages  # noqa: E402
from megatron_save.checkpoint import build_model_from_checkpoint  # noqa: E402
from megatron_save.config import ParallelConfig, RecomputeSettings, load_config  # noqa: E402
from megatron_save.data.batching import PairBatch  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402
from megatron_save.trainers.losses import bt_pair_loss  # noqa: E402
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state  # noqa: E402
from megatron_save.trainers.stage3 import Stage3Config, train_stage3  # noqa: E402
from megatron_save.trainers.stage3 import run as stage3_run  # noqa: E402
from megatron_save.trainers.stage3.batches import policy_rows  # noqa: E402
from megatron_save.trainers.stage3.config import PolicySettings, RewardSettings  # noqa: E402
from megatron_save.trainers.stage3.groups import prepare_groups  # noqa: E402
from megatron_save.trainers.stage3.policy_phase import policy_mini_batches, update_policy  # noqa: E402
from megatron_save.trainers.stage3.reward_phase import update_reward_model  # noqa: E402
from megatron_save.trainers.step import train_step  # noqa: E402
from megatron_save.trainers.strategies import STRATEGIES  # noqa: E402
from megatron_save.utils.tensors import pad_rows  # noqa: E402

LAYOUTS = {"tp2": ParallelConfig(tensor_model_parallel_size=2), "pp2": ParallelConfig(pipeline_model_parallel_size=2)}
CASES = {"none": RecomputeSettings(), "full": RecomputeSettings("full"),
         "full_block": RecomputeSettings("full", "block", 1), "selective": RecomputeSettings("selective")}


class ForwardCounter:
    """Forward calls of every local transformer layer and of its core attention, while ``counting``."""

    def __init__(self, model):
        self.counts, self.counting = Counter(), False
        self.layers = len(model.decoder.layers)
        for index, layer in enumerate(model.decoder.layers):
            layer.register_forward_hook(self._hook(("layer", index)))
            layer.self_attention.core_attention.register_forward_hook(self._hook(("core_attn", index)))

    def _hook(self, key):
        def hook(*_):
            if self.counting:
                self.counts[key] += 1
        return hook

    def gathered(self) -> dict[str, list[list[int]]]:
        """{"layer": [[calls of each local layer] for each rank], "core_attn": ...}."""
        mine = {kind: [self.counts[(kind, i)] for i in range(self.layers)] for kind in ("layer", "core_attn")}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return {kind: [rank[kind] for rank in every] for kind in ("layer", "core_attn")}


def _parameters(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _largest_difference(params: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """max over tensors and ranks of max |p - p_ref| / max |p_ref|."""
    largest = max(((p - r).abs().max() / r.abs().max().clamp(min=1e-12)).item() for p, r in zip(params, reference))
    value = torch.tensor([largest], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def policy_part(args, tokenizer, groups, recompute):
    """Two PPO-clip mini-batches with KL to the reference (an old-log-prob forward of the recompute-built policy in
    eval mode first)."""
    policy, _, _ = build_model_from_checkpoint(args.policy, recompute=recompute)
    reference, _, _ = build_model_from_checkpoint(args.policy)
    settings = PolicySettings(checkpoint=args.policy, micro_batch_size=2, mini_batches=2, kl_coef=0.1,
                              optim=OptimizerSettings(lr=1e-3, decay_style="constant"))
    state = build_train_state(policy, settings.optim, total_steps=2)
    rewards = torch.linspace(-1.0, 1.0, groups.valid.numel()).view_as(groups.valid)
    advantages = token_advantages("grpo", rewards, groups.valid, groups.response_lengths)
    rows = policy_rows(groups.policy_prompt_ids, groups.policy_response_ids, groups.valid, advantages)
    counter = ForwardCounter(policy)
    mini_batches, _, _ = policy_mini_batches(policy, reference, rows, settings, pad_id=0, temperature=0.7)
    counter.counting = True
    metrics = update_policy(state, mini_batches, settings, norm_constant=8.0, temperature=0.7)
    counter.counting = False
    return policy, {"metrics": metrics, "counts": counter.gathered()}


def bt_part(args, tokenizer, groups, recompute):
    """One stage-1 step: the BT loss on 8 pairs of rollout conversations, micro-batches of 2 pairs."""
    model, _, _ = build_model_from_checkpoint(args.reward, recompute=recompute)
    state = build_train_state(model, OptimizerSettings(lr=1e-3, decay_style="constant"), total_steps=1)
    sequences = [sequence for group in groups.rm_sequences for sequence in group]
    micro_batches = PairBatch(*pad_rows(sequences, 0)).split(4)
    counter = ForwardCounter(model)
    counter.counting = True
    metrics = train_step(state, micro_batches, bt_pair_loss, ("loss", "accuracy"))
    counter.counting = False
    return model, {"metrics": metrics, "counts": counter.gathered()}


def save_part(args, tokenizer, groups, recompute):
    """The fused SAVE step (score, partition and train in one forward-backward), micro-batches of one group."""
    model, _, _ = build_model_from_checkpoint(args.reward, recompute=recompute)
    settings = RewardSettings(checkpoint=args.reward, strategy="save", micro_batch_size=1,
                              optim=OptimizerSettings(lr=1e-3, value_head_lr=1e-2, decay_style="constant"))
    state = build_train_state(model, settings.optim, total_steps=1)
    counter = ForwardCounter(model)
    counter.counting = True
    update = update_reward_model(state, STRATEGIES["save"], settings, groups, groups.valid, threshold=0.5, pad_id=0,
                                 value_head=True)
    counter.counting = False
    metrics = {**update.metrics, "reward_count": update.reward_count,
               "rewards": update.scores.rewards[groups.valid].tolist(), "values": update.scores.values.tolist()}
    return model, {"metrics": metrics, "counts": counter.gathered()}


PARTS = {"policy": policy_part, "bt": bt_part, "save": save_part}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage3", action="append", default=[], help='JSON list: ["output_dir=...", ...]')
    args = parser.parse_args()
    init_distributed(ParallelConfig())
    tokenizer = AutoTokenizer.from_pretrained(Path(args.policy) / "hf")
    prompts, rollouts = fixed_rollouts(tokenizer)
    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=128, drop_truncated=False)
    results = {}
    for layout_name, layout in LAYOUTS.items():
        set_model_parallel(layout)
        reference = {}
        for case, recompute in CASES.items():
            for part, run in PARTS.items():
                model, result = run(args, tokenizer, groups, recompute)
                params = _parameters(model)
                reference.setdefault(part, params)
                result["param_rel_diff"] = _largest_difference(params, reference[part])
                result["config"] = {name: getattr(model.config, name) for name in (
                    "recompute_granularity", "recompute_method", "recompute_num_layers")}
                results.setdefault(layout_name, {}).setdefault(case, {})[part] = result
    results["stage3_models"] = {}
    for overrides in args.stage3:
        cfg = load_config(Stage3Config, STAGE3_CPU_CONFIG, json.loads(overrides))
        with recorded_builds() as built:
            train_stage3(cfg)
        results["stage3_models"][Path(cfg.output_dir).name] = built
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutdown_distributed()


@contextlib.contextmanager
def recorded_builds():
    """[checkpoint directory name, recompute granularity] of every model a stage-3 run builds, in order (policy,
    reference, reward model): what reached Megatron's TransformerConfig."""
    original, built = stage3_run.build_model_from_checkpoint, []

    def recording(checkpoint, *args, **kwargs):
        model, meta, hf_config = original(checkpoint, *args, **kwargs)
        built.append([Path(checkpoint).name, model.config.recompute_granularity])
        return model, meta, hf_config

    stage3_run.build_model_from_checkpoint = recording
    try:
        yield built
    finally:
        stage3_run.build_model_from_checkpoint = original


if __name__ == "__main__":
    main()
