"""examples/slurm/stage3_save.sbatch as Slurm runs it on 2 nodes, with stand-ins for scontrol, srun and torchrun on
PATH: the rendezvous settings reach torchrun, and the config it hands stage 3 passes stage 3's checks and the layout
check on 2 x 8 GPUs (as on a GPU machine with Transformer Engine or Apex)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO

TORCHRUN = """
import sys
import megatron_save.trainers.stage3.config as stage3_config
from megatron_save.config import load_config
from megatron_save.distributed.init import check_parallel_layout
from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config
stage3_config.distributed_optimizer_state_supported = lambda: True  # the GPU extras of a cluster
argv = sys.argv[1:]
launcher = dict(zip(argv[:argv.index("-m")][::2], argv[:argv.index("-m")][1::2]))
args = argv[argv.index("stage3") + 1:]
cfg = load_config(Stage3Config, [a for a in args if "=" not in a], [a for a in args if "=" in a])
cfg.rollout.backend = "transformers"  # vLLM needs CUDA: tests/unit/test_stage3_examples.py
check_stage3_config(cfg)
check_parallel_layout(cfg.parallel, int(launcher["--nnodes"]) * int(launcher["--nproc-per-node"]))
print("checked", launcher["--rdzv-endpoint"], launcher["--rdzv-id"], cfg.parallel.tensor_model_parallel_size,
      cfg.output_dir)
"""


def test_sbatch_launches_a_checked_stage3_config(tmp_path):
    stubs = {"scontrol": "#!/bin/sh\necho gpu-node-01\necho gpu-node-02\n",
             "srun": "#!/bin/sh\nexec \"$@\"\n",
             "torchrun": f"#!/bin/sh\nexec {sys.executable} -c '{TORCHRUN}' \"$@\"\n"}
    for name, text in stubs.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "PYTHONWARNINGS": "ignore",
           "SLURM_JOB_NODELIST": "gpu-node-[01-02]", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
           "SLURM_JOB_ID": "4242"}
    result = subprocess.run(["bash", "examples/slurm/stage3_save.sbatch", "examples/paper/stage3_save.yaml",
                             "examples/scaling/stage3_8b.yaml", f"output_dir={tmp_path / 'run'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["checked", "gpu-node-01:29500", "4242", "2", str(tmp_path / "run")]
