"""torchrun worker: Megatron outputs at TP=1, TP=2, PP=2 and TP=2 x PP=2 against transformers, per tiny model.

Writes {"<model>/<layout>": max_abs_diff} to --out. Optionally saves every model again at --resave-layout,
so the round-trip test can export a checkpoint that went through a sharded load.
"""

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import LAYOUTS, prompt_lengths_of, token_batch  # noqa: E402

from megatron_save.checkpoint import build_model_from_checkpoint, save_model_checkpoint  # noqa: E402
from megatron_save.checkpoint.parity import (  # noqa: E402
    max_abs_diff_vs_transformers,
    max_logprob_diff_vs_transformers,
)
from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="json {name: {hf: dir, mg: dir}}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resave-layout", default=None, choices=list(LAYOUTS))
    parser.add_argument("--resave-root", default=None)
    args = parser.parse_args()
    models = json.loads(Path(args.models).read_text())
    input_ids, mask = token_batch()

    init_distributed(ParallelConfig())
    results = {}
    for layout, (tp, pp) in LAYOUTS.items():
        set_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        for name, dirs in models.items():
            diff = max_abs_diff_vs_transformers(dirs["mg"], dirs["hf"], input_ids, mask, micro_batch_size=2,
                                                prompt_lengths=prompt_lengths_of(mask))
            results[f"{name}/{layout}"] = diff
            if name.endswith("-lm"):
                logp_diff, entropy_diff = max_logprob_diff_vs_transformers(dirs["mg"], dirs["hf"], input_ids, mask, 2)
                results[f"{name}/{layout}/logp"] = logp_diff
                results[f"{name}/{layout}/entropy"] = entropy_diff
            if layout == args.resave_layout:
                model, meta, _ = build_model_from_checkpoint(dirs["mg"])
                save_model_checkpoint(model, Path(args.resave_root) / name, meta, Path(dirs["mg"]) / "hf")
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    main()
