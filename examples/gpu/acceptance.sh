#!/usr/bin/env bash
# GPU acceptance, the first thing to run on a fresh H100 / H200 (at most 16 minutes): first the GPU test tier
# (python -m pytest -m gpu tests, at most 8 minutes: TE spec parity and a bf16 step, weight sync from a TE-spec
# model, fused SwiGLU / TE norms, CUDA RNG in run checkpoints, distributed-optimizer resume, offload, SAVE vs GRPO),
# then sections (at most 8 minutes): tiny and Qwen2.5-0.5B-shaped bf16 models through the local and (if importable)
# Transformer Engine specs against transformers, stages 1 and 2 in bf16, stage 3 GRPO vs SAVE through
# tools/bench_stage3.py (time, passes, peak memory per phase), vLLM rollouts if importable. Writes REPORT (commit
# it) and per-section logs under WORK_DIR/logs. Without CUDA it runs the tiny path on CPU processes (the tier's tests
# skip with the reason). --tier-budget-s 0 leaves the tier out. See tools/gpu_acceptance.py for the sections.
# Usage: bash examples/gpu/acceptance.sh [WORK_DIR] [REPORT] [more tools/gpu_acceptance.py flags]
#        (default outputs/gpu_acceptance docs/gpu/REPORT.md)
set -euo pipefail
work=${1:-outputs/gpu_acceptance}
report=${2:-docs/gpu/REPORT.md}
shift 2 || shift $# || true
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
python tools/gpu_acceptance.py --work "$work" --report "$report" "$@"
