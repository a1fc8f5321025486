#!/usr/bin/env bash
# Builds a tiny random Llama, converts it to Megatron, runs it at TP=2 on 2 CPU processes (gloo) and
# compares it with transformers on the built-in chat sample (logit difference, relative difference,
# top-1 agreement, next-token log-probs; exit 1 on a mismatch); then converts it back to HF.
set -euo pipefail
work=${1:-outputs/tiny_parity}
rm -rf "$work" && mkdir -p "$work"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
python tools/make_tiny_model.py --family llama --out "$work/hf"
python tools/convert_hf_to_megatron.py --hf-dir "$work/hf" --out "$work/megatron"
torchrun --standalone --nproc-per-node 2 tools/check_parity.py --ckpt "$work/megatron" --hf-dir "$work/hf" --tp 2
python tools/convert_megatron_to_hf.py --ckpt "$work/megatron" --out "$work/hf_roundtrip"
echo "checkpoints under $work: hf/ (original), megatron/ (dist checkpoint), hf_roundtrip/ (exported)"
