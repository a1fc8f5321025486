#!/usr/bin/env bash
# Converts the paper's reward model (Skywork-Reward-V2-Llama-3.2-3B) to a Megatron checkpoint in bf16.
set -euo pipefail
python tools/convert_hf_to_megatron.py --hf-dir Skywork/Skywork-Reward-V2-Llama-3.2-3B \
  --out checkpoints/skywork_rm_3b --dtype bf16
