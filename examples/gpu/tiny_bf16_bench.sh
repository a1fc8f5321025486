#!/usr/bin/env bash
# The tiny stage-3 config on GPU in bf16, measured: per-phase step time and peak memory of plain GRPO (frozen RM)
# against SAVE (tools/bench_stage3.py, alternating launches), then the same with idle state offloaded between
# phases, then with vLLM rollouts when vLLM is importable. On a machine without CUDA it runs on CPU processes
# (gloo) and reports host memory instead; the vLLM part is skipped.
# Usage: bash examples/gpu/tiny_bf16_bench.sh [WORK_DIR] [NPROC] [key=value ...]   (default outputs/tiny_bf16, 1)
# BENCH_ARGS adds flags to every tools/bench_stage3.py call (--steps N --rounds N, or --check-only to check the
# configs and run nothing).
set -euo pipefail
work=${1:-outputs/tiny_bf16}
nproc=${2:-1}
shift 2 || shift $# || true
rm -rf "$work" && mkdir -p "$work"
export PYTHONWARNINGS=ignore
python tools/make_tiny_model.py --family llama --out "$work/hf_policy" --seed 1
python tools/make_tiny_model.py --family llama --reward-model --value-head --out "$work/hf_rm" --seed 2
python tools/make_synthetic_data.py --out "$work/data" --prompts 64
python tools/convert_hf_to_megatron.py --hf-dir "$work/hf_policy" --out "$work/policy_init" --dtype bf16
python tools/convert_hf_to_megatron.py --hf-dir "$work/hf_rm" --out "$work/rm_init" --dtype bf16
bench=(python tools/bench_stage3.py --config examples/cpu/stage3_save.yaml --nproc "$nproc" --steps 6 --rounds 2
       --policy "$work/policy_init" --reward "$work/rm_init" --prompts "$work/data/prompts.jsonl"
       ${BENCH_ARGS:-} parallel.tensor_model_parallel_size="$nproc" "$@")
echo "== bf16, transformers rollouts"
"${bench[@]}"
echo "== bf16, transformers rollouts, optimizer states, gradient buffers and reference offloaded between phases"
"${bench[@]}" offload.optimizer=true offload.gradients=true offload.reference=true
if python -c "import torch, vllm; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "== bf16, vLLM rollouts"
  "${bench[@]}" rollout.backend=vllm rollout.vllm.tensor_parallel_size="$nproc" rollout.vllm.gpu_memory_utilization=0.2
fi
