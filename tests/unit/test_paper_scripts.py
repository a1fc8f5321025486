"""examples/paper/run_stage3.sh, as a user launches each variant: the config it hands torchrun passes stage 3's
config check (a stand-in torchrun on PATH loads and checks it instead of training)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

VARIANTS = ["save", "save_no_curriculum", "frozen", "offline_bt", "mean_reward", "hl_bt", "r2m", "prime",
            "frozen_policy"]
CHECK = """
import sys
from megatron_save.config import load_config
from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config
args = sys.argv[sys.argv.index("stage3") + 1:]
cfg = load_config(Stage3Config, [a for a in args if "=" not in a], [a for a in args if "=" in a])
check_stage3_config(cfg)
print("checked", cfg.reward.strategy, cfg.output_dir)
"""


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_passes_the_config_check(variant, tmp_path):
    stub = tmp_path / "torchrun"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{CHECK}' \"$@\"\n")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "PYTHONWARNINGS": "ignore",
           "OUTPUT_DIR": str(tmp_path / "run")}
    result = subprocess.run(["bash", "examples/paper/run_stage3.sh", variant], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    strategy = "save" if variant == "frozen_policy" else variant
    assert f"checked {strategy} {tmp_path / 'run'}" in result.stdout
