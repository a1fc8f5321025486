"""torchrun worker: stage-3 runs one after another in one launch, so that several runs at the same layout pay for
one start-up. Each --settings is a JSON list of key=value overrides of examples/cpu/stage3_save.yaml."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import STAGE3_CPU_CONFIG  # noqa: E402

from megatron_save.config import load_config  # noqa: E402
from megatron_save.distributed import shutdown_distributed  # noqa: E402
from megatron_save.trainers.stage3 import Stage3Config, train_stage3  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", action="append", required=True, help='JSON list: ["output_dir=...", ...]')
    args = parser.parse_args()
    for overrides in args.settings:
        train_stage3(load_config(Stage3Config, STAGE3_CPU_CONFIG, json.loads(overrides)))
    shutdown_distributed()


if __name__ == "__main__":
    main()
