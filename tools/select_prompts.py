"""Selects the recipe's RL and value-anchor prompts from UltraFeedback by the length of its completions (paper
appendix F.1: "we select UltraFeedback instructions whose responses exceed 1024 tokens").

    python tools/select_prompts.py                                  # openbmb/UltraFeedback -> the paper's default
    python tools/select_prompts.py --data ultrafeedback.parquet --tokenizer checkpoints/qwen3_4b_instruct \\
        --rule any --min-response-tokens 1024 --out data/ultrafeedback_prompts.jsonl
    python tools/select_prompts.py --rule all --min-response-tokens 0 --max-response-tokens 1024   # "within"

Input rows: UltraFeedback's ``instruction`` (str) and ``completions`` (a list of {"response": str, ...}).
Output: ``{"prompt": instruction}`` JSON lines (instructions stripped of surrounding whitespace, each once, in
first-seen order), what stage 3's ``train_data`` and sample-responses' ``prompt_data`` read. Each completion's
``response`` is counted on its own with ``--tokenizer`` (no chat template, no special tokens).

Why ``--rule any`` by default. F.1 leaves open whether one, every, or the average of an instruction's completions
must exceed the bound. Each UltraFeedback instruction has four completions written by four different models
(from 7B chat models to GPT-4), whose lengths on one instruction differ widely: an instruction "whose responses
exceed 1024 tokens" reads most plainly as one that draws such a response at all; ``all`` would ask it of the
tersest of four unrelated models too, and a mean is a statistic the sentence does not name. ``any`` is also the
weakest of the three, leaving the largest set, and the RL stage draws 320 steps x 32 prompts = 10,240 prompts
(Table 8). Check the count this prints before a run.

The direction is open too: F.1 gives training stability as the reason, and its later "we further filter out
responses longer than 1024 tokens" reads as if the first filter also cut long ones; ``--min-response-tokens 0
--max-response-tokens 1024 --rule all`` selects that reading (every completion within 1024 tokens). The default
follows the text as written.

Why the policy's tokenizer by default: 1024 is the policy's generation limit (Table 8), so the lengths are policy
tokens; the default is the Qwen3-4B-Instruct-2507 checkpoint of examples/paper/stage3_save.yaml (Qwen2.5-3B-Instruct,
the paper's other policy, tokenizes text alike).

Rows with an empty instruction or no completions, rows outside the rule and repeated instructions are counted and
printed; none is dropped silently.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR, META_FILE
from megatron_save.data.loading import load_rows, require_fields
from megatron_save.data.recipe_data import (
    LENGTH_RULES,
    LengthRule,
    check_length_rule,
    select_instructions,
    token_counter,
    write_jsonl_file,
)

POLICY_CHECKPOINT = "checkpoints/qwen3_4b_instruct"  # examples/paper/stage3_save.yaml, policy.checkpoint
FIELDS = ("instruction", "completions")


def load_tokenizer(source: str):
    """The tokenizer of a megatron-save checkpoint directory (its hf/ side files), of an HF model directory, or of
    a hub name."""
    from transformers import AutoTokenizer

    path = Path(source)
    if (path / META_FILE).is_file():
        path = path / HF_SUBDIR
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else source)
    except (OSError, ValueError) as error:
        raise SystemExit(f"select_prompts: --tokenizer {source}: no tokenizer there ({error}); pass our checkpoint "
                         "directory (tools/convert_hf_to_megatron.py), an HF directory or a hub name") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="openbmb/UltraFeedback",
                        help="UltraFeedback rows: a json / jsonl / parquet file or a hub dataset")
    parser.add_argument("--split", default="train", help="split of a hub dataset")
    parser.add_argument("--out", default="data/ultrafeedback_prompts.jsonl")
    parser.add_argument("--tokenizer", default=POLICY_CHECKPOINT,
                        help="whose tokens count: our checkpoint directory, an HF directory or a hub name "
                             "(default: the paper config's policy)")
    parser.add_argument("--min-response-tokens", type=int, default=1024,
                        help="a completion passes when longer than this (F.1: 1024)")
    parser.add_argument("--max-response-tokens", type=int, default=None,
                        help="... and at most this long (default: no upper bound)")
    parser.add_argument("--rule", default="any", help=f"one of {', '.join(LENGTH_RULES)}: whether any completion, "
                        "every completion, or their mean length must pass (default: any, see above)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many selected prompts")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rule = LengthRule(args.min_response_tokens, args.max_response_tokens, args.rule)
    try:
        check_length_rule(rule)  # before anything is loaded
    except ValueError as error:
        raise SystemExit(f"select_prompts: {error}") from None
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"select_prompts: --limit {args.limit} must be >= 1")
    tokenizer = load_tokenizer(args.tokenizer)
    rows = load_rows(args.data, args.split)
    require_fields(rows, FIELDS, args.data)
    rows = rows.select_columns(list(FIELDS))  # the completions' annotations are not needed
    prompts, report = select_instructions(rows, token_counter(tokenizer), rule, args.data, args.limit)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items())) or "none"
    if not prompts:
        raise SystemExit(f"select_prompts: no instruction of {args.data} has {rule.describe()} "
                         f"({report.rows} rows read, skipped: {skipped}); nothing written")
    write_jsonl_file(({"prompt": prompt} for prompt in prompts), args.out)
    print(f"{args.out}: {len(prompts)} prompts with {rule.describe()} ({args.tokenizer} tokens)")
    print(f"{args.data}: {report.rows} rows read, {report.kept} kept, skipped: {skipped}")


if __name__ == "__main__":
    main(sys.argv[1:])
