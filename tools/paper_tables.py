"""Writes the paper's Table 1 (RM benchmarks) and Table 3's answer index from a run of
examples/paper/reproduce.sh, which calls it last.

    python tools/paper_tables.py --work work/paper --rm-name Skywork-Reward-V2-Llama-3.2-3B \\
        --policies Qwen2.5-3B-Instruct Qwen3-4B-Instruct-2507 --rows save hl_bt initial --out work/paper/tables

Writes OUT/table1.md (rows of Table 1 among --rows) and OUT/table3.md (rows of Table 3 among --rows, with their
answer files and counts); megatron_save/evaluation/paper_tables.py lists the rows and where their results lie.
"""

import argparse
from pathlib import Path

from megatron_save.evaluation.paper_tables import ROWS, table1_markdown, table3_markdown


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="reproduce.sh's WORK directory")
    parser.add_argument("--rm-name", required=True, help="the initial RM's name (Table 1's first row)")
    parser.add_argument("--policies", nargs="+", required=True, help="policy names, one section each")
    parser.add_argument("--rows", nargs="+", required=True, choices=ROWS, help="the rows that were run")
    parser.add_argument("--out", required=True, help="output directory")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.md").write_text(table1_markdown(args.work, args.rm_name, args.policies, args.rows))
    (out / "table3.md").write_text(table3_markdown(args.work, args.policies, args.rows))
    print((out / "table1.md").read_text(), end="")
    print(f"wrote {out / 'table1.md'} and {out / 'table3.md'}")


if __name__ == "__main__":
    main()
