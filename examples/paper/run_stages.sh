#!/usr/bin/env bash
# Stages 1 and 2 on one node of 4 GPUs (the paper's machine). Settings of either stage can be overridden as
# key=value in STAGE1_ARGS / STAGE2_ARGS, e.g.
#   STAGE1_ARGS="parallel.tensor_model_parallel_size=2 eval_every=100" bash examples/paper/run_stages.sh
set -euo pipefail
GPUS=${GPUS:-4}
torchrun --nproc-per-node "$GPUS" -m megatron_save stage1 examples/paper/stage1_bt.yaml ${STAGE1_ARGS:-}
torchrun --nproc-per-node "$GPUS" -m megatron_save stage2 examples/paper/stage2_value_anchor.yaml \
  checkpoint=checkpoints/rm_stage1 ${STAGE2_ARGS:-}
python tools/convert_megatron_to_hf.py --ckpt checkpoints/rm_value_anchored --out hf/rm_value_anchored
