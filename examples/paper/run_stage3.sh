#!/usr/bin/env bash
# Stage 3 on one node of 4 GPUs: SAVE, or one baseline of the paper's Tables 1-3.
#   bash examples/paper/run_stage3.sh                      # SAVE
#   bash examples/paper/run_stage3.sh hl_bt                # HL-BT baseline (also frozen, offline_bt, mean_reward,
#                                                          #   save_no_curriculum, r2m, prime; frozen_policy = SAVE
#                                                          #   w/o policy optimization)
#   bash examples/paper/run_stage3.sh save examples/algorithms/gspo.yaml policy.kl_coef=0.02
# Each variant and YAML overlay gets its own run directory (checkpoints/stage3_save_gspo above; OUTPUT_DIR=...
# chooses another). A launch resumes from its run directory's checkpoints/latest when there is one; a launch with
# other settings than the run's is refused.
set -euo pipefail
GPUS=${GPUS:-4}
variant=${1:-save}
shift || true
# stage3_save.yaml leaves truncated responses out of the RM update (F.1); strategies that do not learn from the
# rollouts' responses have no such update, so they turn it off.
no_rollout_update="reward.update_skips_truncated=false"
case "$variant" in
  frozen_policy) settings=("reward.strategy=save" "policy.frozen=true") ;;
  frozen) settings=("reward.strategy=frozen" "$no_rollout_update") ;;
  offline_bt) settings=("reward.strategy=offline_bt" "reward.offline_data=data/ultrafeedback_binarized_pairs.jsonl"
                        "$no_rollout_update") ;;
  r2m) settings=("reward.strategy=r2m" "reward.optim.lr=1e-6" "$no_rollout_update") ;;   # R2M's head LR
  # PRIME (Table 3): its RLOO advantages; the implicit PRM starts from the policy, labels from the frozen RM.
  prime) settings=("reward.strategy=prime" "policy.advantage=rloo"
                   "reward.prime.optim.use_distributed_optimizer=true") ;;
  *) settings=("reward.strategy=$variant") ;;
esac
name="stage3_${variant}"
for arg in "$@"; do
  case "$arg" in *.yaml) name="${name}_$(basename "$arg" .yaml)" ;; esac
done
out=${OUTPUT_DIR:-checkpoints/$name}
torchrun --nproc-per-node "$GPUS" -m megatron_save stage3 examples/paper/stage3_save.yaml "$@" \
  output_dir="$out" "${settings[@]}"
# Strategies that train the reward model itself leave output_dir/reward_model (frozen, r2m and prime do not;
# prime leaves its implicit PRM in output_dir/prm).
if [ -d "$out/reward_model" ]; then
  python tools/convert_megatron_to_hf.py --ckpt "$out/reward_model" --out "hf/${name}_reward_model"
fi
