"""Converts a Hugging Face Llama 3.x / Qwen2 / Qwen2.5 / Qwen3 causal LM or single-label reward model
(``*ForSequenceClassification``, the Skywork-Reward-V2 format) to a Megatron dist_checkpointing checkpoint
that loads at any TP / PP; or, with --as-reward-model, a reward model made of a causal LM (its backbone, a fresh
reward head as ``*ForSequenceClassification`` initialises one, a zero value head for stage 2).

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR_OR_HUB_NAME --out CKPT_DIR [--dtype bf16]
    python tools/convert_hf_to_megatron.py --hf-dir CAUSAL_LM --out RM_CKPT_DIR --as-reward-model [--seed 0]

A large model converts under torchrun: each rank reads only its layers' and experts' tensors and holds its part
of the model (1 / (TP x PP), experts 1 / EP; its peak is about 1.5 times that part, README "Scaling"), e.g. a 70B
model on 8 processes:

    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py --hf-dir HF_DIR --out CKPT_DIR --pp 8
"""

import argparse


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    from megatron_save.config.parallel import add_layout_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (or a hub name, on a cluster)")
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    parser.add_argument("--add-value-head", action="store_true",
                        help="give a reward model without a value head a zero-initialised one (for stage 2)")
    parser.add_argument("--as-reward-model", action="store_true",
                        help="make a reward model of a *ForCausalLM: its backbone, a fresh reward head, a zero "
                             "value head (exports as *ForSequenceClassification + value_head.safetensors)")
    parser.add_argument("--reward-head-std", type=float, default=None,
                        help="--as-reward-model: std of the fresh reward head; default the config's "
                             "initializer_range")
    parser.add_argument("--seed", type=int, default=0, help="--as-reward-model: seed of the reward head's draw")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="parameter dtype; default: the HF config's dtype (bf16 stays bf16, else fp32)")
    add_layout_arguments(parser)
    return parser


def main() -> None:
    # Imported here, not at the top: Megatron-Core's checkpoint writer starts a helper with multiprocessing's spawn
    # method, which runs this script's top level again; kept light, that helper imports no torch or Megatron.
    from megatron_save.checkpoint.convert import convert_hf_to_megatron
    from megatron_save.config.parallel import layout_from_arguments
    from megatron_save.distributed import shutdown_distributed

    parser = build_parser()
    args = parser.parse_args()
    convert_hf_to_megatron(args.hf_dir, args.out, dtype=args.dtype, add_value_head=args.add_value_head,
                           as_reward_model=args.as_reward_model, reward_head_std=args.reward_head_std,
                           seed=args.seed, parallel=layout_from_arguments(args))
    shutdown_distributed()


if __name__ == "__main__":
    main()
