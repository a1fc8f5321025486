"""Runs a measuring command and writes what it printed under a provenance stamp: the file README quotes.

    python tools/record.py --out docs/perf/bench_save.txt -- python tools/bench_save.py --rounds 20

The file starts with the command, the git revision and whether the tree had uncommitted changes, the date, the
CPU model and core count and the wall time, then holds the command's output (stdout and stderr, interleaved as
printed). The command's exit status is recorded and returned: a failed measurement is written, and marked, not
hidden.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from megatron_save.utils.provenance import current_provenance


def record(command: list[str], out: Path) -> int:
    """Runs ``command``, echoing its output, and writes the stamped record to ``out``; returns its exit status."""
    provenance = current_provenance(command=shlex.join(command))
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        lines.append(line)
    status = process.wait()
    wall = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{provenance.as_text()}\nwall_time_s: {wall:.1f}\nexit_status: {status}\n\n{''.join(lines)}")
    return status


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the record to write (usually under docs/)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: tools/record.py --out FILE -- COMMAND ...")
    sys.exit(record(command, args.out))


if __name__ == "__main__":
    main()
