#!/usr/bin/env bash
# Stages 1 and 2 on one node of 4 GPUs (the paper's machine). Override any setting as key=value, e.g.
#   bash examples/paper/run_stages.sh parallel.tensor_model_parallel_size=2
set -euo pipefail
GPUS=${GPUS:-4}
torchrun --nproc-per-node "$GPUS" -m megatron_save.trainers.stage1_bt examples/paper/stage1_bt.yaml "$@"
torchrun --nproc-per-node "$GPUS" -m megatron_save.trainers.stage2_value examples/paper/stage2_value_anchor.yaml \
  checkpoint=checkpoints/rm_stage1 "$@"
python tools/convert_megatron_to_hf.py --ckpt checkpoints/rm_value_anchored --out hf/rm_value_anchored
