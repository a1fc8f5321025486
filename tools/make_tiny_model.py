"""Writes a random tiny Llama / Qwen2 / Qwen3 model (causal LM or reward model) with a tokenizer to a directory.

    python tools/make_tiny_model.py --family llama --out /tmp/tiny-llama [--reward-model [--value-head]] [--seed 0]

--scale 0.5b gives the same family at Qwen2.5-0.5B's shape (for GPU checks; about 2 GB in fp32).
"""

import argparse

from megatron_save.testing import SCALES, TINY_FAMILIES, TINY_MOE_FAMILIES, save_tiny_hf_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=TINY_FAMILIES + TINY_MOE_FAMILIES, default="llama")
    parser.add_argument("--out", required=True, help="output directory (HF format)")
    parser.add_argument("--reward-model", action="store_true", help="*ForSequenceClassification with one label")
    parser.add_argument("--value-head", action="store_true", help="reward model with a random value head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny", help="model shape (default tiny)")
    args = parser.parse_args()
    if args.value_head and not args.reward_model:
        parser.error("--value-head needs --reward-model")
    out = save_tiny_hf_model(args.family, args.out, reward_model=args.reward_model, seed=args.seed,
                             value_head=args.value_head, **SCALES[args.scale])
    kind = "reward model" if args.reward_model else "causal LM"
    print(f"wrote {args.scale} {args.family} {kind} to {out}")


if __name__ == "__main__":
    main()
