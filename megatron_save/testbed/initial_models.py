"""The testbed's starting models, as Megatron checkpoints.

    python -m megatron_save testbed-models policy --out DIR --seed S --family F
        a tiny random policy built from a config with transformers -> DIR/policy_init
    python -m megatron_save testbed-models reward-model --out DIR --policy CKPT --seed S
        the reward model initialised from the (SFT) policy, as InstructGPT does: the policy's backbone under a
        fresh scalar head (the policy had to read L from the prompt to answer, so V(x) can too) -> DIR/rm_init
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_save.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_save.testing import TINY_FAMILIES, save_tiny_hf_model


def reward_model_from_policy(policy_ckpt: Path, out: Path, seed: int, reward_head_std: float) -> Path:
    """Exports the policy to HF and converts it as a reward model: its backbone under a fresh reward head
    (std ``reward_head_std``) and a zero value head: out/hf_policy_export, out/rm_init."""
    hf_policy = convert_megatron_to_hf(policy_ckpt, out / "hf_policy_export")
    convert_hf_to_megatron(hf_policy, out / "rm_init", as_reward_model=True, reward_head_std=reward_head_std,
                           seed=seed)
    return out / "rm_init"


def build_parser() -> argparse.ArgumentParser:
    """The command line of this command (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(prog="megatron-save testbed-models", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("policy", "reward-model"))
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=TINY_FAMILIES, default="llama", help="policy: tiny model family")
    parser.add_argument("--policy", help="reward-model: the policy checkpoint to start from")
    parser.add_argument("--reward-head-std", type=float, default=0.02, help="reward-model: initial head std")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.model == "policy":
        convert_hf_to_megatron(save_tiny_hf_model(args.family, out / "hf_policy", seed=args.seed),
                               out / "policy_init")
    else:
        if not args.policy:
            parser.error("reward-model needs --policy")
        reward_model_from_policy(Path(args.policy), out, args.seed, args.reward_head_std)


if __name__ == "__main__":
    main()
