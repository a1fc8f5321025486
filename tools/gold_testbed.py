"""The gold-reward testbed: SAVE and the baselines against a programmatic gold reward, on CPU.

    python tools/gold_testbed.py                      # one seed, frozen vs save (about 4 minutes on 2 cores)
    python tools/gold_testbed.py --full               # 3 seeds, every strategy, report in docs/gold_testbed
    python tools/gold_testbed.py [--full] [MORE.yaml ...] [key=value ...]

A repeated command continues where the last one stopped (finished steps are kept).
"""

import argparse
import sys
from pathlib import Path

from megatron_save.config import ConfigError, load_config
from megatron_save.config.describe import format_settings
from megatron_save.testbed.pipeline import EXAMPLES, TestbedConfig, run_testbed

CONFIG_SCHEMA = TestbedConfig
"""What the key=value overrides set (the docs test checks the documented ones against it)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"settings (key=value):\n{format_settings(TestbedConfig)}")
    parser.add_argument("--full", action="store_true", help=f"the full comparison ({EXAMPLES / 'full.yaml'})")
    parser.add_argument("settings", nargs="*", help="more YAML files, then key=value overrides")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    files = [EXAMPLES / "gold_testbed.yaml"] + ([EXAMPLES / "full.yaml"] if args.full else [])
    files += [s for s in args.settings if "=" not in s]
    try:
        cfg = load_config(TestbedConfig, files, [s for s in args.settings if "=" in s])
    except ConfigError as error:  # a bad file, setting or value: one line, exit 2
        parser.error(str(error))
    report = run_testbed(cfg)
    sys.stdout.write((report / "results.md").read_text())
    plots = ", ".join(str(p) for p in sorted(Path(report).glob("*.png")))
    sys.stdout.write(f"\ntable: {report / 'results.md'} (and results.json)\nplots: {plots}\n")


if __name__ == "__main__":
    main()
