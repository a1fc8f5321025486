"""Generates a policy's answers to AlpacaEval 2 or Arena-Hard-v2.0 prompts, in the format those tools read.

    python tools/convert_megatron_to_hf.py --ckpt POLICY_CKPT --out HF_DIR
    python tools/export_policy_answers.py --benchmark alpaca_eval --prompts alpaca_eval.json \\
        --hf-model HF_DIR --model-name my-policy --out outputs/alpaca_eval/model_outputs.json
    python tools/export_policy_answers.py --benchmark arena_hard --prompts arena-hard-v2.0/question.jsonl \\
        --hf-model HF_DIR --model-name my-policy --out arena-hard-v2.0/model_answer/my-policy.jsonl
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
from megatron_save.rollout import SamplingSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=sorted(FORMATS))
    parser.add_argument("--prompts", required=True, help="the benchmark's prompt file (json / jsonl / parquet)")
    parser.add_argument("--hf-model", required=True, help="HF causal-LM directory of the policy")
    parser.add_argument("--model-name", required=True, help="generator / model name written into the records")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (when --temperature > 0)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke tests)")
    args = parser.parse_args()
    rows = read_prompts(args.prompts, args.benchmark)[: args.limit]
    sampling = SamplingSettings(n=1, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    answers = generate_answers(args.hf_model, [row[FORMATS[args.benchmark]] for row in rows], sampling,
                               args.batch_size)
    build = alpaca_eval_records if args.benchmark == "alpaca_eval" else arena_hard_records
    write_records(build(rows, answers, args.model_name), args.benchmark, args.out)
    print(f"wrote {len(rows)} answers to {args.out}")


if __name__ == "__main__":
    main()
