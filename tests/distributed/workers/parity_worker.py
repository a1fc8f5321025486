"""torchrun worker: Megatron outputs at TP=1, TP=2, PP=2 and TP=2 x PP=2 against transformers, per tiny model.

Writes {"<model>/<layout>": max_abs_diff} to --out. Optionally saves every model again at --resave-layout,
so the round-trip test can export a checkpoint that went through a sharded load.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import LAYOUTS, token_batch  # noqa: E402

from megatron_save.checkpoint import build_model_from_checkpoint, read_checkpoint_meta, save_model_checkpoint  # noqa: E402
from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed  # noqa: E402
from megatron_save.models.forward import gather_vocab_logits, pipeline_forward, reward_scores  # noqa: E402


def hf_reference(hf_dir: str, reward_model: bool, input_ids, mask) -> torch.Tensor:
    auto = transformers.AutoModelForSequenceClassification if reward_model else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=mask.long()).logits
    return output[:, 0] if reward_model else output  # [B] scores or [B, S, V] logits


def megatron_output(ckpt: str, reward_model: bool, input_ids, mask) -> torch.Tensor | None:
    model, _, _ = build_model_from_checkpoint(ckpt)
    if reward_model:
        return reward_scores(model, input_ids, mask, micro_batch_size=2)  # [B] on every rank
    logits = pipeline_forward(model, input_ids, micro_batch_size=2)
    return None if logits is None else gather_vocab_logits(logits)


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
    references = {}
    for name, dirs in models.items():
        kind = read_checkpoint_meta(dirs["mg"])[0].kind
        references[name] = hf_reference(dirs["hf"], kind == "reward_model", input_ids, mask)

    results = {}
    for layout, (tp, pp) in LAYOUTS.items():
        set_model_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        for name, dirs in models.items():
            reward_model = name.endswith("-rm")
            output = megatron_output(dirs["mg"], reward_model, input_ids, mask)
            if output is not None:
                error = (output.float() - references[name]).abs()
                # Logits at padding positions differ by design (HF masks pad keys); compare real tokens only.
                diff = (error if reward_model else error[mask]).max().item()
                results[f"{name}/{layout}"] = max(diff, results.get(f"{name}/{layout}", 0.0))
            if layout == args.resave_layout:
                model, meta, _ = build_model_from_checkpoint(dirs["mg"])
                save_model_checkpoint(model, Path(args.resave_root) / name, meta, Path(dirs["mg"]) / "hf")

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {}
        for rank_results in gathered:
            for key, diff in rank_results.items():
                merged[key] = max(diff, merged.get(key, 0.0))
        Path(args.out).write_text(json.dumps(merged, indent=2))
    parallel_state.destroy_model_parallel()
    shutdown_distributed()


if __name__ == "__main__":
    main()
