#!/usr/bin/env bash
# The whole path on a real pretrained model on CPU: SmolLM2-135M-Instruct (from PyPI, see tools/fetch_smollm2.py)
# as the policy and, through --as-reward-model, as the reward model; stage 1 (Bradley-Terry), stage 2 (value
# head), stage 3 (SAVE) at PP=2 on 2 processes, with learning rates that suit a pretrained model
# (examples/cpu/real_smollm2/*.yaml), then the trained models exported to HF. The preference data is the
# synthetic task of tools/make_synthetic_data.py (its rule: vowel-heavy responses win), so the numbers say that
# the machinery works on a real model, not how good SmolLM2 is at anything.
# Usage: bash examples/cpu/real_smollm2.sh [WORK_DIR] [stage-3 key=value ...]   (default outputs/real_smollm2)
# Sizes, from the environment: PAIRS (stage-1 pairs), PROMPTS (stage-2 / stage-3 prompts), STEPS (stage-3
# steps), SMOLLM2_CACHE (where the model is kept between runs), NPROC (processes; the YAMLs' PP=2 needs 2).
set -euo pipefail
work=${1:-outputs/real_smollm2}
shift || true
PAIRS=${PAIRS:-480} PROMPTS=${PROMPTS:-96} STEPS=${STEPS:-8} NPROC=${NPROC:-2}
SMOLLM2_CACHE=${SMOLLM2_CACHE:-outputs/model_cache}
config=examples/cpu/real_smollm2
rm -rf "$work" && mkdir -p "$work"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
run() { torchrun --standalone --nproc-per-node "$NPROC" -m megatron_save "$@"; }
start=$SECONDS
hf=$(python tools/fetch_smollm2.py --cache-dir "$SMOLLM2_CACHE" | tail -n 1)
python tools/make_synthetic_data.py --out "$work/data" --pairs "$PAIRS" --prompts "$PROMPTS" --responses 4
python tools/convert_hf_to_megatron.py --hf-dir "$hf" --out "$work/policy_init"
python tools/convert_hf_to_megatron.py --hf-dir "$hf" --out "$work/rm_init" --as-reward-model
echo "models ready after $((SECONDS - start)) s"
run stage1 "$config/stage1_bt.yaml" checkpoint="$work/rm_init" output_dir="$work/stage1" \
  data.train_data="$work/data/preference_train.jsonl" data.eval_data="$work/data/preference_eval.jsonl"
echo "stage 1 done after $((SECONDS - start)) s"
run stage2 "$config/stage2_value.yaml" checkpoint="$work/stage1" output_dir="$work/stage2" \
  data.train_data="$work/data/responses.jsonl"
echo "stage 2 done after $((SECONDS - start)) s"
run stage3 "$config/stage3_save.yaml" output_dir="$work/rl" train_data="$work/data/prompts.jsonl" \
  policy.checkpoint="$work/policy_init" reward.checkpoint="$work/stage2" total_steps="$STEPS" "$@"
echo "stage 3 done after $((SECONDS - start)) s"
python tools/convert_megatron_to_hf.py --ckpt "$work/rl/policy" --out "$work/hf_policy"
python tools/convert_megatron_to_hf.py --ckpt "$work/rl/reward_model" --out "$work/hf_reward_model"
echo "done in $((SECONDS - start)) s: metrics $work/stage1/metrics.json, $work/stage2/metrics.json," \
  "$work/rl/metrics.jsonl; HF exports $work/hf_policy, $work/hf_reward_model"
