"""Converts a Hugging Face Llama 3.x / Qwen2 / Qwen2.5 / Qwen3 causal LM or single-label reward model
(``*ForSequenceClassification``, the Skywork-Reward-V2 format) to a Megatron dist_checkpointing checkpoint
that loads at any TP / PP.

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR_OR_HUB_NAME --out CKPT_DIR [--dtype bf16]
"""

import argparse


def main() -> None:
    # Imported here, not at the top: Megatron-Core's checkpoint writer starts a helper with multiprocessing's spawn
    # method, which runs this script's top level again; kept light, that helper imports no torch or Megatron.
    from megatron_save.checkpoint.convert import convert_hf_to_megatron
    from megatron_save.distributed import shutdown_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (or a hub name, on a cluster)")
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    parser.add_argument("--add-value-head", action="store_true",
                        help="give a reward model without a value head a zero-initialised one (for stage 2)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="parameter dtype; default: the HF config's dtype (bf16 stays bf16, else fp32)")
    args = parser.parse_args()
    convert_hf_to_megatron(args.hf_dir, args.out, dtype=args.dtype, add_value_head=args.add_value_head)
    shutdown_distributed()


if __name__ == "__main__":
    main()
