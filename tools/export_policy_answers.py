"""Generates a policy's answers to AlpacaEval 2 and / or Arena-Hard-v2.0 prompts, in the formats those tools read.

    python tools/convert_megatron_to_hf.py --ckpt POLICY_CKPT --out HF_DIR
    python tools/export_policy_answers.py --benchmark alpaca_eval --prompts alpaca_eval.json \\
        --hf-model HF_DIR --model-name my-policy --out outputs/alpaca_eval/model_outputs.json
    python tools/export_policy_answers.py --hf-model HF_DIR --model-name my-policy \\
        --benchmark alpaca_eval --prompts alpaca_eval.json --out answers/alpaca_eval/model_outputs.json \\
        --benchmark arena_hard --prompts arena-hard-v2.0/question.jsonl --out answers/arena_hard/my-policy.jsonl

Several --benchmark / --prompts / --out triples (in the same order) share one model load. --ckpt takes a
megatron-save policy checkpoint instead of --hf-model: it is converted first, into --hf-out (kept) or a temporary
directory.
"""

import argparse
import tempfile
from pathlib import Path

from megatron_save.evaluation.policy_export import (
    FORMATS,
    alpaca_eval_records,
    arena_hard_records,
    generate_answers,
    read_prompts,
    write_records,
)
from megatron_save.rollout import SamplingSettings, TransformersRolloutEngine


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, action="append", choices=sorted(FORMATS))
    parser.add_argument("--prompts", required=True, action="append",
                        help="the benchmark's prompt file (json / jsonl / parquet), one per --benchmark")
    parser.add_argument("--out", required=True, action="append", help="output file, one per --benchmark")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf-model", help="HF causal-LM directory (or hub name) of the policy")
    model.add_argument("--ckpt", help="megatron-save policy checkpoint (any TP / PP), converted to HF first")
    parser.add_argument("--hf-out", help="with --ckpt: where the HF export goes (default: a temporary directory)")
    parser.add_argument("--model-name", required=True, help="generator / model name written into the records")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (when --temperature > 0)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke tests)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if not len(args.benchmark) == len(args.prompts) == len(args.out):
        parser.error("give each --benchmark its --prompts and --out, in the same order")
    if args.hf_out and not args.ckpt:
        parser.error("--hf-out goes with --ckpt")
    jobs = [(benchmark, read_prompts(prompts, benchmark)[: args.limit], out)
            for benchmark, prompts, out in zip(args.benchmark, args.prompts, args.out)]
    sampling = SamplingSettings(n=1, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        engine = TransformersRolloutEngine(args.hf_model or exported(args.ckpt, args.hf_out or Path(scratch) / "hf"))
        for benchmark, rows, out in jobs:
            answers = generate_answers(engine, [row[FORMATS[benchmark]] for row in rows], sampling, args.batch_size)
            build = alpaca_eval_records if benchmark == "alpaca_eval" else arena_hard_records
            write_records(build(rows, answers, args.model_name), benchmark, out)
            print(f"wrote {len(rows)} {benchmark} answers to {out}")


def exported(ckpt: str, out: str | Path) -> str:
    """The HF directory of a policy checkpoint, converted in this process as a world of one."""
    from megatron_save.checkpoint.convert import convert_megatron_to_hf
    from megatron_save.distributed import shutdown_distributed

    convert_megatron_to_hf(ckpt, out)
    shutdown_distributed()
    return str(out)


if __name__ == "__main__":
    main()
