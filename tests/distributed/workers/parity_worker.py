"""torchrun worker (4 processes): Megatron outputs against transformers, per tiny model and layout: TP=1, TP=2,
PP=2 and TP=2 x PP=2, or with --moe the expert-parallel and expert-tensor-parallel layouts of a Qwen3-MoE (whose
HF tensors are also gathered at each layout and compared with the originals).

Writes {"<model>/<layout>[/logp|/entropy|/gather]": max_abs_diff} to --out. Optionally saves every model again at
--resave-layout, so the round-trip test can export a checkpoint that went through a sharded load.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import LAYOUTS, MOE_LAYOUTS, prompt_lengths_of, token_batch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from megatron_save.checkpoint import build_model_from_checkpoint, save_model_checkpoint  # noqa: E402
from megatron_save.checkpoint.hf import VALUE_HEAD_FILE  # noqa: E402
from megatron_save.checkpoint.hf.gather import gather_hf_state  # noqa: E402
from megatron_save.checkpoint.parity import (  # noqa: E402
    max_abs_diff_vs_transformers,
    max_logprob_diff_vs_transformers,
)
from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402
from megatron_save.models.families import family_for  # noqa: E402


def gathered_diff(mg_dir: str, hf_dir: str) -> float:
    """Largest |gathered - original| over every HF tensor; inf when a name is missing or extra."""
    original = load_file(Path(hf_dir) / "model.safetensors")
    if (Path(hf_dir) / VALUE_HEAD_FILE).exists():
        original.update(load_file(Path(hf_dir) / VALUE_HEAD_FILE))
    model, _, hf_config = build_model_from_checkpoint(mg_dir)
    gathered = dict(gather_hf_state(model, family_for(hf_config), hf_config))
    if sorted(gathered) != sorted(original):
        return float("inf")
    return max((gathered[name] - tensor).abs().max().item() for name, tensor in original.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="json {name: {hf: dir, mg: dir}}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--moe", action="store_true", help="the MoE layouts (TP, PP, EP, expert TP), and gathers")
    parser.add_argument("--resave-layout", default=None)
    parser.add_argument("--resave-root", default=None)
    args = parser.parse_args()
    layouts = MOE_LAYOUTS if args.moe else {name: (tp, pp, 1, 1) for name, (tp, pp) in LAYOUTS.items()}
    if args.resave_layout is not None and args.resave_layout not in layouts:
        raise SystemExit(f"--resave-layout {args.resave_layout}: not one of {sorted(layouts)}")
    models = json.loads(Path(args.models).read_text())
    input_ids, mask = token_batch()

    init_distributed(ParallelConfig())
    results = {}
    for layout, (tp, pp, ep, etp) in layouts.items():
        set_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                          expert_model_parallel_size=ep, expert_tensor_parallel_size=etp))
        for name, dirs in models.items():
            results[f"{name}/{layout}"] = max_abs_diff_vs_transformers(
                dirs["mg"], dirs["hf"], input_ids, mask, micro_batch_size=2, prompt_lengths=prompt_lengths_of(mask))
            if name.endswith("-lm"):
                logp_diff, entropy_diff = max_logprob_diff_vs_transformers(dirs["mg"], dirs["hf"], input_ids, mask, 2)
                results[f"{name}/{layout}/logp"] = logp_diff
                results[f"{name}/{layout}/entropy"] = entropy_diff
            if args.moe:
                results[f"{name}/{layout}/gather"] = gathered_diff(dirs["mg"], dirs["hf"])
            if layout == args.resave_layout:
                model, meta, _ = build_model_from_checkpoint(dirs["mg"])
                save_model_checkpoint(model, Path(args.resave_root) / name, meta, Path(dirs["mg"]) / "hf")
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
