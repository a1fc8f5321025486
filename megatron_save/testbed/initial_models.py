"""The testbed's starting models: a tiny random policy and a tiny random reward model, built from configs with
transformers and converted to Megatron checkpoints (``policy_init``, ``rm_init`` under ``--out``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.testing import TINY_FAMILIES, save_tiny_hf_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory for hf_policy, hf_rm, policy_init and rm_init")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=TINY_FAMILIES, default="llama")
    parser.add_argument("--reward-head-std", type=float, default=0.02)
    args = parser.parse_args()
    out = Path(args.out)
    save_tiny_hf_model(args.family, out / "hf_policy", seed=args.seed)
    save_tiny_hf_model(args.family, out / "hf_rm", reward_model=True, seed=args.seed + 10_000,
                       reward_head_std=args.reward_head_std)
    convert_hf_to_megatron(out / "hf_policy", out / "policy_init")
    convert_hf_to_megatron(out / "hf_rm", out / "rm_init")


if __name__ == "__main__":
    main()
