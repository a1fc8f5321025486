"""Writes small synthetic data files with a known right answer (for trying the stages without a hub).

    python tools/make_synthetic_data.py --out DIR [--pairs 600 --prompts 240 --responses 8 --seed 0]

DIR/preference_train.jsonl, DIR/preference_eval.jsonl: {"prompt", "chosen", "rejected"} rows (stage 1);
DIR/responses.jsonl: {"prompt", "responses": [...]} rows (stage 2);
DIR/prompts.jsonl: {"prompt"} rows (stage 3).
"""

import argparse
from pathlib import Path

from megatron_save.testing.synthetic import (
    synthetic_preference_rows,
    synthetic_prompts,
    synthetic_response_groups,
    write_jsonl,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    out = Path(args.out)
    write_jsonl(synthetic_preference_rows(args.pairs, args.seed), out / "preference_train.jsonl")
    write_jsonl(synthetic_preference_rows(args.pairs // 8, args.seed + 1), out / "preference_eval.jsonl")
    write_jsonl(synthetic_response_groups(args.prompts, args.responses, args.seed + 2), out / "responses.jsonl")
    write_jsonl(synthetic_prompts(args.prompts, args.seed + 3), out / "prompts.jsonl")
    print(f"wrote synthetic data to {out}")


if __name__ == "__main__":
    main()
