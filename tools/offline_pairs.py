"""The continual offline BT baseline's preference pairs (paper 6.1 and F.1: "the corresponding instruction-response
pairs from ultrafeedback_binarized, matched to the same instruction set").

    python tools/select_prompts.py                 # first: data/ultrafeedback_prompts.jsonl
    python tools/offline_pairs.py                  # HuggingFaceH4/ultrafeedback_binarized, split train_prefs
    python tools/offline_pairs.py --pairs binarized.parquet --prompts data/ultrafeedback_prompts.jsonl \\
        --out data/ultrafeedback_binarized_pairs.jsonl

Keeps the ultrafeedback_binarized rows (``prompt`` str, ``chosen`` / ``rejected`` chat message lists) whose prompt
equals a selected prompt after stripping surrounding whitespace on both sides, every such row (a prompt may have
more than one pair), and writes ``{"prompt", "chosen", "rejected"}`` JSON lines: what stage 1's ``data.train_data``
and stage 3's ``reward.offline_data`` (reward.strategy=offline_bt, examples/paper/reproduce.sh) read. Prints how
many pairs were kept, how many pair rows were skipped and why, and how many selected prompts found no pair.
"""

from __future__ import annotations

import argparse
import sys

from megatron_save.data.loading import load_rows, require_fields
from megatron_save.data.recipe_data import match_preference_pairs, selection_prompts, write_jsonl_file

SHOWN_UNMATCHED = 3


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="data/ultrafeedback_prompts.jsonl",
                        help="the selected prompts: rows with a 'prompt' string (tools/select_prompts.py)")
    parser.add_argument("--prompts-split", default="train", help="split of --prompts when it is a hub dataset")
    parser.add_argument("--pairs", default="HuggingFaceH4/ultrafeedback_binarized",
                        help="ultrafeedback_binarized rows: a json / jsonl / parquet file or a hub dataset")
    parser.add_argument("--split", default="train_prefs", help="split of --pairs when it is a hub dataset")
    parser.add_argument("--out", default="data/ultrafeedback_binarized_pairs.jsonl")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    selection = load_rows(args.prompts, args.prompts_split)
    require_fields(selection, ("prompt",), args.prompts)
    prompts = selection_prompts(selection, args.prompts)
    rows = load_rows(args.pairs, args.split)
    require_fields(rows, ("prompt", "chosen", "rejected"), args.pairs)
    rows = rows.select_columns(["prompt", "chosen", "rejected"])
    pairs, report = match_preference_pairs(rows, prompts, args.pairs)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items())) or "none"
    if not pairs:
        raise SystemExit(f"offline_pairs: no row of {args.pairs} has a prompt of {args.prompts} "
                         f"({report.rows} rows read, skipped: {skipped}); nothing written")
    write_jsonl_file(pairs, args.out)
    found = report.selected - len(report.unmatched)
    print(f"{args.out}: {len(pairs)} pairs for {found} of {report.selected} selected prompts")
    print(f"{args.pairs}: {report.rows} rows read, {report.kept} kept, skipped: {skipped}")
    print(f"{len(report.unmatched)} selected prompts have no pair"
          + "".join(f"\n  {prompt[:100]!r}" for prompt in report.unmatched[:SHOWN_UNMATCHED])
          + ("\n  ..." if len(report.unmatched) > SHOWN_UNMATCHED else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
