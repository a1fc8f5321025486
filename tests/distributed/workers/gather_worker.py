"""torchrun worker: full HF tensors gathered from a sharded Megatron model at every layout, for the weight sync."""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import LAYOUTS, hf_tensors  # noqa: E402

from megatron_save.checkpoint import build_model_from_checkpoint  # noqa: E402
from megatron_save.checkpoint.hf.gather import gather_hf_state  # noqa: E402
from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402
from megatron_save.models.families import family_for  # noqa: E402
from megatron_save.testing.te_names import with_te_parameter_names  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    models = json.loads(Path(args.models).read_text())
    init_distributed(ParallelConfig())
    results = {}
    for layout, (tp, pp) in LAYOUTS.items():
        set_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        for name, dirs in models.items():
            model, meta, hf_config = build_model_from_checkpoint(dirs["mg"])
            if dirs.get("te_names"):  # the parameter names of a Transformer Engine spec model
                with_te_parameter_names(model)
            original = hf_tensors(dirs["hf"])
            gathered = dict(gather_hf_state(model, family_for(hf_config), hf_config))
            if hf_config.tie_word_embeddings:
                original.pop("lm_head.weight", None)
            exact = sorted(original) == sorted(gathered) and all(
                torch.equal(gathered[k].cpu(), original[k]) for k in original)
            results[f"{name}/{layout}/rank{dist.get_rank()}"] = exact
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, results)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({k: v for part in everything for k, v in part.items()}, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    main()
