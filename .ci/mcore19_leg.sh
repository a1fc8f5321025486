#!/usr/bin/env bash
# CI leg on megatron-core 0.19.2, the newest release we support (.ci/run tests README's environment, 0.16.1).
# Builds its own virtual environment, .venv-mc19 (kept between runs: a rerun only checks it), and runs the unit
# tests plus one distributed / e2e file per area of Megatron-Core's APIs, to fit about 8 minutes on a 2-core CI
# machine: parity and conversion round trips (test_parity), training parity, MoE (inference, conversion, EP),
# resume (plain and distributed optimizer), stage 3 with the Megatron rollout engine at TP=2 x PP=2 (test_stage3;
# the engine's unit tests are in tests/unit). Measured CPU seconds (user + sys) on 0.19.2: unit 121, test_parity 58,
# test_moe 59, test_training_parity 193, test_resume 33, e2e/test_stage3 167 (left out: test_conversion_layouts 147,
# covered by the round trips; test_stage3_parallel, covered by test_stage3).
set -euo pipefail
cd "$(dirname "$0")/.."

MEGATRON_CORE=0.19.2
# megatron-core 0.18+ imports triton when megatron.core loads (transformer/moe/ops/paged_stash.py); CUDA torch
# wheels bring it, the CPU wheel does not. Nothing runs a triton kernel on CPU: any release that imports will do.
TRITON=3.6.0

python3 -m venv .venv-mc19
. .venv-mc19/bin/activate
pip install torch==2.13.0 -e ".[dev]"
installed=$(python -c 'from importlib.metadata import version; print(version("megatron-core"))')
if [ "$installed" != "$MEGATRON_CORE" ]; then
  # 0.17+ declares Python >= 3.12; its cp311 wheel runs on 3.11 (all modules compile), so the check is skipped
  # there. Its own requirements (torch, numpy, packaging) are in place already.
  python_check=$(python -c 'import sys; print("--ignore-requires-python" if sys.version_info < (3, 12) else "")')
  pip install --no-deps --force-reinstall $python_check "megatron-core==$MEGATRON_CORE"
fi
python -c 'import triton' 2>/dev/null || pip install "triton==$TRITON"
python - "$MEGATRON_CORE" <<'EOF'
import sys
from importlib.metadata import version

import megatron.core  # noqa: F401  (fails here, not in every test, if the environment is broken)

assert version("megatron-core") == sys.argv[1], f"megatron-core {version('megatron-core')} installed, want {sys.argv[1]}"
EOF

python -m pytest -n 2 --dist loadfile \
  tests/unit \
  tests/distributed/test_parity.py \
  tests/distributed/test_training_parity.py \
  tests/distributed/test_moe.py \
  tests/distributed/test_resume.py \
  tests/e2e/test_stage3.py
