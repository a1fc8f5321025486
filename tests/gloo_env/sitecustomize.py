"""Run at start-up by every process the test suite launches (tests/helpers.py puts this directory first on their
PYTHONPATH, with CUDA hidden): Transformer Engine and NVIDIA Apex look not installed, to imports and to
``importlib.util.find_spec`` alike, so the processes run as on a CPU machine also on a GPU machine that has them
(megatron-core would otherwise pick their CUDA-only fused optimizers and norms for host-memory models)."""

import sys

for _name in ("transformer_engine", "apex"):
    sys.modules[_name] = None
