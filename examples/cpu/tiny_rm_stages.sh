#!/usr/bin/env bash
# Stages 1 and 2 of SAVE on CPU with a tiny random Llama reward model and synthetic data:
# stage 1 (Bradley-Terry) at TP=2 on 2 processes, stage 2 (value anchor) at PP=2, then export to HF.
# Usage: bash examples/cpu/tiny_rm_stages.sh [WORK_DIR]   (default outputs/tiny_rm)
# Tiny random models only; for a real pretrained model see examples/cpu/real_smollm2.sh.
set -euo pipefail
work=${1:-outputs/tiny_rm}
rm -rf "$work" && mkdir -p "$work"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
python tools/make_tiny_model.py --family llama --reward-model --out "$work/hf_init"
python tools/make_synthetic_data.py --out "$work/data"
python tools/convert_hf_to_megatron.py --hf-dir "$work/hf_init" --out "$work/rm_init"
torchrun --standalone --nproc-per-node 2 -m megatron_save stage1 examples/cpu/stage1_bt.yaml \
  checkpoint="$work/rm_init" output_dir="$work/stage1" \
  data.train_data="$work/data/preference_train.jsonl" data.eval_data="$work/data/preference_eval.jsonl"
torchrun --standalone --nproc-per-node 2 -m megatron_save stage2 examples/cpu/stage2_value.yaml \
  checkpoint="$work/stage1" output_dir="$work/stage2" data.train_data="$work/data/responses.jsonl"
python tools/convert_megatron_to_hf.py --ckpt "$work/stage2" --out "$work/hf_stage2"
echo "metrics: $work/stage1/metrics.json, $work/stage2/metrics.json; HF export with value head: $work/hf_stage2"
