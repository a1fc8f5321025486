#!/usr/bin/env bash
# Stage 3 of SAVE on CPU: a tiny random Llama policy and a tiny random Llama reward model with a value head,
# synthetic prompts, 2 processes at TP=2. Extra key=value arguments override examples/cpu/stage3_save.yaml
# (for example reward.strategy=hl_bt or policy.loss=gspo). The models are random: their rewards barely differ
# within a group, so most steps are value-only RM updates (logged) while V(x) settles on the reward scale; the
# contrastive term appears on steps where a group straddles V. A meaningful testbed is a separate issue.
# Usage: bash examples/cpu/tiny_save_rl.sh [WORK_DIR] [key=value ...]   (default outputs/tiny_save)
# Tiny random models only; for a real pretrained model see examples/cpu/real_smollm2.sh.
set -euo pipefail
work=${1:-outputs/tiny_save}
shift || true
rm -rf "$work" && mkdir -p "$work"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
python tools/make_tiny_model.py --family llama --out "$work/hf_policy" --seed 1
python tools/make_tiny_model.py --family llama --reward-model --value-head --out "$work/hf_rm" --seed 2
python tools/make_synthetic_data.py --out "$work/data" --prompts 64
python tools/convert_hf_to_megatron.py --hf-dir "$work/hf_policy" --out "$work/policy_init"
python tools/convert_hf_to_megatron.py --hf-dir "$work/hf_rm" --out "$work/rm_init"
torchrun --standalone --nproc-per-node 2 -m megatron_save stage3 examples/cpu/stage3_save.yaml \
  output_dir="$work/rl" train_data="$work/data/prompts.jsonl" \
  policy.checkpoint="$work/policy_init" reward.checkpoint="$work/rm_init" "$@"
echo "metrics: $work/rl/metrics.jsonl, TensorBoard: $work/rl/tensorboard; trained models: $work/rl/policy, $work/rl/reward_model"
