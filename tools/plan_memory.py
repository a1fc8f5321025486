"""Per-GPU memory of a stage-3 run (policy, reference, reward model, rollout engine) at a parallel layout.

    python tools/plan_memory.py --policy CONFIG --reward CONFIG --tp 2 --pp 1 --dp 4 --dtype bf16 \
        --micro-batch 2 --reward-micro-batch 32 --distributed-optimizer --value-head [--json]

CONFIG is an HF config.json, a directory holding one, or a hub name. The reward config is a single-label
*ForSequenceClassification or a causal LM (planned as converted with --as-reward-model: its lm_head replaced by
the [1, hidden] reward head). The bytes model is megatron_save/planning/memory.py's (its docstring says what is
counted and what is not). The output is a table of the peak of each phase of a stage-3 step (rollout, log-probs,
RM scoring, RM update, policy update) with its parts, the all-resident total beside it, and the run's peak.

With --gpu-memory 80GB every layout of --gpus GPUs (default TP x PP x DP) that both models split is searched
together with recompute (--policy-recompute / --reward-recompute), token budgets and offload; for each parallel
layout whose peak can fit, its cheapest settings are listed, the cheapest layout first (settings_cost in
megatron_save/planning/memory.py says why that order); --fixed-settings varies the parallel layout only. The
exit status is 1 when none fits. --comment prints the block the examples/scaling YAML headers hold.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

from megatron_save.planning import (MemoryLayout, architecture_from_hf, candidate_layouts, parse_bytes,
                                    plan_memory)
from megatron_save.planning.memory import (GIB, KNOBS, RECOMPUTE_GRANULARITIES, STAGE3_SETTINGS, Recompute,
                                           changed_settings, phase_table, search_fits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="HF config of the policy (a causal LM)")
    parser.add_argument("--reward", required=True, help="HF config of the reward model")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    parser.add_argument("--etp", type=int, default=1, help="tensor-parallel size inside each expert")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per policy forward-backward")
    parser.add_argument("--reward-micro-batch", type=int, default=None,
                        help="sequences per reward-model forward-backward (reward.micro_batch_size x G; "
                             "default: --micro-batch)")
    parser.add_argument("--prompt-length", type=int, default=1024, help="longest prompt (tokens)")
    parser.add_argument("--response-length", type=int, default=1024, help="longest response (tokens)")
    parser.add_argument("--rollout-batch", type=int, default=64,
                        help="sequences one rollout engine generates at once (rollout.max_batch_size)")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--recompute", action="store_true",
                        help="full activation recompute of both models (--policy-recompute full --reward-recompute full)")
    parser.add_argument("--policy-recompute", type=recompute_arg, default=None, metavar="GRANULARITY[/METHOD/N]",
                        help="policy.recompute: selective, full (uniform, 1 layer) or full/METHOD/NUM_LAYERS")
    parser.add_argument("--reward-recompute", type=recompute_arg, default=None, metavar="GRANULARITY[/METHOD/N]",
                        help="reward.recompute, as --policy-recompute")
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=0,
                        help="policy.max_tokens_per_micro_batch (0: fixed micro-batches of --micro-batch)")
    parser.add_argument("--reward-max-tokens-per-micro-batch", type=int, default=0,
                        help="reward.max_tokens_per_micro_batch (0: fixed micro-batches of --reward-micro-batch)")
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--offload-gradients", action="store_true")
    parser.add_argument("--offload-reference", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="no KL reference (policy.kl_coef=0)")
    parser.add_argument("--frozen-reward", action="store_true", help="the RM is not trained (reward.strategy=frozen)")
    parser.add_argument("--rollout-backend", choices=("transformers", "megatron", "vllm"), default="transformers")
    parser.add_argument("--vllm-kv-cache-gib", type=float, default=None,
                        help="--rollout-backend vllm: the KV cache each engine reserves "
                             "(rollout.vllm.kv_cache_memory_gib; default: what --rollout-batch fills)")
    parser.add_argument("--vllm-awake", action="store_true",
                        help="--rollout-backend vllm with rollout.vllm.sleep_between_rollouts=false: its weights and "
                             "KV cache stay on the GPU through the training phases")
    parser.add_argument("--value-head", action="store_true", help="the RM has a [1, hidden] value head")
    parser.add_argument("--spec", choices=("te", "local"), default="te",
                        help="layer implementation of the activation model (default te: GPU with Transformer Engine)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--gpu-memory", help="list the layouts that fit this much per GPU (80GB, 80GiB, bytes)")
    parser.add_argument("--gpus", type=int, default=None, help="total GPUs of --gpu-memory's layouts "
                                                                "(default TP x PP x DP)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of --gpu-memory kept free for the CUDA context, NCCL buffers and "
                             "fragmentation (default 0.1)")
    parser.add_argument("--margin-gib", type=float, default=None,
                        help="GiB of --gpu-memory kept free instead of --headroom (the stages' memory_check.margin_gib)")
    parser.add_argument("--fixed-settings", action="store_true",
                        help="with --gpu-memory: vary the parallel layout only, not recompute, token budgets or "
                             "offload")
    parser.add_argument("--comment", action="store_true", help="print the YAML comment block of this command")
    return parser


def recompute_arg(text: str) -> Recompute:
    """'selective', 'full' or 'full/block/2' -> Recompute; 'none' -> no recompute."""
    granularity, *rest = text.split("/")
    if granularity == "none" and not rest:
        return Recompute()
    if granularity not in RECOMPUTE_GRANULARITIES or len(rest) not in (0, 2) or (rest and granularity != "full"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected none, selective, full or full/METHOD/NUM_LAYERS")
    if not rest:
        return Recompute(granularity)
    try:
        return Recompute(granularity, rest[0], int(rest[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: NUM_LAYERS must be an integer") from None


def load_architecture(source: str, reward_model: bool):
    """The planner's Architecture of an HF config file, directory or hub name."""
    from transformers import AutoConfig

    path = Path(source)
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else source)
    except (OSError, ValueError) as error:
        raise SystemExit(f"plan_memory: cannot read the HF config {source!r}: {error}") from None
    architecture = (getattr(config, "architectures", None) or [""])[0]
    classifier = architecture.endswith("ForSequenceClassification")
    if classifier and not reward_model:
        raise SystemExit(f"plan_memory: --policy {source}: {architecture} is a reward model; the policy must be a "
                         "causal LM")
    if classifier and getattr(config, "num_labels", 1) != 1:
        raise SystemExit(f"plan_memory: --reward {source}: {architecture} with num_labels={config.num_labels}: "
                         "only single-label (scalar) reward models")
    try:
        return architecture_from_hf(config, reward_model=reward_model, source=source)
    except ValueError as error:
        raise SystemExit(f"plan_memory: {error}") from None


def layout_of(args: argparse.Namespace) -> MemoryLayout:
    return MemoryLayout(
        tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep, etp=args.etp, dtype=args.dtype,
        micro_batch=args.micro_batch,
        reward_micro_batch=args.reward_micro_batch if args.reward_micro_batch is not None else args.micro_batch,
        prompt_length=args.prompt_length, response_length=args.response_length, rollout_batch=args.rollout_batch,
        distributed_optimizer=args.distributed_optimizer,
        policy_recompute=args.policy_recompute or Recompute("full" if args.recompute else None),
        reward_recompute=args.reward_recompute or Recompute("full" if args.recompute else None),
        max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        reward_max_tokens_per_micro_batch=args.reward_max_tokens_per_micro_batch, vllm_sleep=not args.vllm_awake,
        offload_optimizer=args.offload_optimizer, offload_gradients=args.offload_gradients,
        offload_reference=args.offload_reference, reference=not args.no_reference,
        reward_trained=not args.frozen_reward, value_head=args.value_head, rollout_backend=args.rollout_backend,
        vllm_kv_cache_bytes=None if args.vllm_kv_cache_gib is None else int(args.vllm_kv_cache_gib * GIB),
        spec=args.spec)


def plan_json(plan) -> dict:
    """The plan as JSON: the all-resident parts (``per_gpu_bytes``), each phase, the peak and the layout."""
    return {"per_gpu_bytes": dict(plan.per_gpu_bytes),
            "phases": [{"name": p.name, "stage": p.stage, "parts": dict(p.parts), "total": p.total}
                       for p in plan.phases],
            "peak": {"phase": plan.peak_phase.name, "bytes": plan.peak},
            "layout": {**asdict(plan.layout), "stage": plan.stage}}


def run(argv: list[str]) -> tuple[int, list[str]]:
    """(exit status, output lines) of the command line ``argv``."""
    args = build_parser().parse_args(argv)
    policy = load_architecture(args.policy, reward_model=False)
    reward = load_architecture(args.reward, reward_model=True)
    layout = layout_of(args)
    if args.gpu_memory is None:
        try:
            plan = plan_memory(policy, reward, layout)
        except ValueError as error:
            return 2, [f"plan_memory: {error}"]
        if args.comment:
            return 0, comment_block(argv, phase_table(plan))
        return 0, [json.dumps(plan_json(plan), indent=1)] if args.json else phase_table(plan)
    try:
        capacity = parse_bytes(args.gpu_memory)
    except ValueError as error:
        return 2, [f"plan_memory: --gpu-memory: {error}"]
    if args.margin_gib is None:
        budget, kept = int(capacity * (1 - args.headroom)), f"{args.headroom:.0%} headroom"
    else:
        budget, kept = capacity - int(args.margin_gib * GIB), f"a {args.margin_gib:g} GiB margin"
    gpus = args.gpus or layout.tp * layout.pp * layout.dp
    layouts = candidate_layouts(policy, reward, gpus, layout)
    knobs = () if args.fixed_settings else KNOBS
    fitting = search_fits(lambda variant: plan_memory(policy, reward, variant), layouts, budget, knobs)
    if not fitting:
        plans = []
        for candidate in layouts:
            try:
                plans.append(plan_memory(policy, reward, candidate))
            except ValueError:  # a setting this layout cannot take (search_fits skips it too)
                continue
        smallest = min(plans, key=lambda plan: plan.peak, default=None)
        best = (f"; the smallest peak is {smallest.peak / GIB:.2f} GiB per GPU (TP {smallest.layout.tp} x PP "
                f"{smallest.layout.pp} x DP {smallest.layout.dp}, EP {smallest.layout.ep}, "
                f"{smallest.peak_phase.name})") if smallest else ""
        return 1, [f"plan_memory: no layout of {gpus} GPUs fits {args.gpu_memory} per GPU less {kept} "
                   f"({budget / GIB:.2f} GiB): {len(layouts)} layouts tried"
                   + (" with recompute, token budgets and offload" if knobs else "") + best]
    if args.json:
        return 0, [json.dumps({"gpu_memory_bytes": capacity, "budget_bytes": budget,
                               "layouts": [plan_json(plan) for plan in fitting]}, indent=1)]
    lines = [f"layouts of {gpus} GPUs whose peak fits {args.gpu_memory} per GPU less {kept} "
             f"({budget / GIB:.2f} GiB), each with its cheapest settings, cheapest first "
             "(megatron_save/planning/memory.py settings_cost):",
             f"  {'TP':>3} {'PP':>3} {'EP':>3} {'DP':>4} {'peak GiB':>9}  {'peak phase':<14} settings changed"]
    names = {k: v for k, v in STAGE3_SETTINGS.items() if k not in ("tp", "pp", "ep")}
    lines += [f"  {p.layout.tp:>3} {p.layout.pp:>3} {p.layout.ep:>3} {p.layout.dp:>4} {p.peak / GIB:>9.2f}  "
              f"{p.peak_phase.name:<14} {' '.join(changed_settings(layout, p.layout, names)) or '-'}"
              for p in fitting]
    return 0, lines


def comment_block(argv: list[str], lines: list[str]) -> list[str]:
    """The YAML comment: the command (wrapped at 118 columns with backslashes), then the table, each line
    prefixed with '# '."""
    words = [shlex.quote(arg) for arg in ["python", "tools/plan_memory.py", *argv] if arg != "--comment"]
    tokens = []  # an option and its value stay on one line: joined by a character textwrap does not break at
    for word in words:
        if tokens and tokens[-1].startswith("--") and "\0" not in tokens[-1] and not word.startswith("--"):
            tokens[-1] += "\0" + word
        else:
            tokens.append(word)
    wrapped = [line.replace("\0", " ") for line in textwrap.wrap(
        " ".join(tokens), width=112, break_long_words=False, break_on_hyphens=False, subsequent_indent="  ")]
    out = [f"# {line} \\" for line in wrapped[:-1]] + [f"# {wrapped[-1]}:"]
    return out + [f"# {line}" for line in lines]


def parse_comment_command(yaml_text: str) -> list[str] | None:
    """The planner's arguments written in a YAML comment by ``comment_block`` (None without one)."""
    lines = yaml_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# python tools/plan_memory.py")), None)
    if start is None:
        return None
    parts = []
    for line in lines[start:]:
        text = line[2:].rstrip()
        if text.endswith("\\"):
            parts.append(text[:-1])
            continue
        parts.append(text.removesuffix(":"))
        break
    return shlex.split(" ".join(parts))[2:]


def main() -> None:
    status, lines = run(sys.argv[1:])
    print("\n".join(lines), file=sys.stderr if status else sys.stdout)
    sys.exit(status)


if __name__ == "__main__":
    main()
