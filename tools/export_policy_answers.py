"""Generates a policy's answers to AlpacaEval 2 and / or Arena-Hard-v2.0 prompts, in the formats those tools read.

    python tools/convert_megatron_to_hf.py --ckpt POLICY_CKPT --out HF_DIR
    python tools/export_policy_answers.py --benchmark alpaca_eval --prompts alpaca_eval.json \\
        --hf-model HF_DIR --model-name my-policy --out outputs/alpaca_eval/model_outputs.json
    python tools/export_policy_answers.py --hf-model HF_DIR --model-name my-policy \\
        --benchmark alpaca_eval --prompts alpaca_eval.json --out answers/alpaca_eval/model_outputs.json \\
        --benchmark arena_hard --prompts arena-hard-v2.0/question.jsonl --out answers/arena_hard/my-policy.jsonl

Several --benchmark / --prompts / --out triples (in the same order) share one model load.
"""

import argparse

from megatron_save.evaluation.policy_export import (
    FORMATS,
    alpaca_eval_records,
    arena_hard_records,
    generate_answers,
    read_prompts,
    write_records,
)
from megatron_save.rollout import SamplingSettings, TransformersRolloutEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, action="append", choices=sorted(FORMATS))
    parser.add_argument("--prompts", required=True, action="append",
                        help="the benchmark's prompt file (json / jsonl / parquet), one per --benchmark")
    parser.add_argument("--out", required=True, action="append", help="output file, one per --benchmark")
    parser.add_argument("--hf-model", required=True, help="HF causal-LM directory of the policy")
    parser.add_argument("--model-name", required=True, help="generator / model name written into the records")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (when --temperature > 0)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke tests)")
    args = parser.parse_args()
    if not len(args.benchmark) == len(args.prompts) == len(args.out):
        parser.error("give each --benchmark its --prompts and --out, in the same order")
    jobs = [(benchmark, read_prompts(prompts, benchmark)[: args.limit], out)
            for benchmark, prompts, out in zip(args.benchmark, args.prompts, args.out)]
    sampling = SamplingSettings(n=1, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    engine = TransformersRolloutEngine(args.hf_model)
    for benchmark, rows, out in jobs:
        answers = generate_answers(engine, [row[FORMATS[benchmark]] for row in rows], sampling, args.batch_size)
        build = alpaca_eval_records if benchmark == "alpaca_eval" else arena_hard_records
        write_records(build(rows, answers, args.model_name), benchmark, out)
        print(f"wrote {len(rows)} {benchmark} answers to {out}")


if __name__ == "__main__":
    main()
