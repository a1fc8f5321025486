"""SAVE's cost over GRPO against model size on CPU: the same stage-3 step with reward.strategy=frozen (GRPO with a
fixed RM) and =save, at several model sizes and response lengths, in alternating rounds.

    python tools/cost_vs_size.py --out docs/scaling/cost [--sizes h256,h384,h576x15,smollm2-135m] \
        [--lengths 8,32] [--rounds 3] [--steps 2] [--work DIR]
    python tools/cost_vs_size.py --out docs/scaling/cost --summarize   # rewrite the tables from launches.jsonl

Each size is a random Llama-family policy and reward model (with a value head) of that shape and SmolLM2's
vocabulary (49152, tied embeddings), made with megatron_save.testing and converted once, with a character
tokenizer widened to the vocabulary (each id one character), so that every sampled token decodes to text the
reward model reads back token for token. One round runs, for every
(size, length) cell, a frozen and a save launch of tools/bench_stage3.py's kind (one process, TP 1, the CPU example
config), which of the two goes first alternating by round, so a slow spell of the shared machine hits both sides
of a pair. Rounds are the outer loop: after round 1 every cell has a measurement, and each launch is appended to
OUT/launches.jsonl as it ends (with the machine's load average before and after), so an interrupted study keeps
what it measured. The first step of a launch is warm-up and left out.

OUT/results.md and OUT/results.json give, per cell, the SAVE / GRPO ratio of step time and of rank 0's peak host
memory (median and [min-max] of the rounds' paired ratios), each phase's share of the step for both strategies,
and the memory planner's per-process bytes for the same run (fp32, local spec) beside the measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench_stage3 import STRATEGIES, launch

from megatron_save.utils.provenance import current_provenance

GIB = 2**30
CONFIG = "examples/cpu/stage3_save.yaml"
# Shapes from 256 wide up to SmolLM2-135M's real one; every one with SmolLM2's vocabulary and tied embeddings.
SIZES: dict[str, dict[str, int]] = {
    "h256": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "h384": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                 num_key_value_heads=2),
    "h576x15": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=15, num_attention_heads=9,
                    num_key_value_heads=3),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
    # For the tool's own test: seconds per launch.
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
VOCAB = 49152
PROMPTS_PER_STEP = 2
GROUP = 4
PROMPT_LENGTH = 64  # the CPU example's max_prompt_length


def shape_overrides(size: str) -> dict:
    return {**SIZES[size], "vocab_size": VOCAB if size != "tiny" else 128, "tie_word_embeddings": True,
            "max_position_embeddings": 16384}


def wide_tokenizer(vocab_size: int):
    """The tiny character tokenizer with one more single-character token per id up to ``vocab_size`` (CJK
    ideographs): every id the random policy samples decodes to one character that the reward model's tokenizer
    reads back as the same single id, so responses are never empty and the RM sees as many tokens as the policy
    made (the plain tiny tokenizer decodes ids past its ~100 characters to nothing: empty, invalid responses)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from megatron_save.testing import tiny_tokenizer

    base = tiny_tokenizer()
    vocab = dict(base.get_vocab())
    extra = (chr(c) for c in [*range(0x4E00, 0xA000), *range(0x20000, 0x2A6E0)])
    while len(vocab) < vocab_size:
        vocab.setdefault(next(extra), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=base.unk_token))
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=base.pad_token, bos_token=base.bos_token,
                                   eos_token=base.eos_token, unk_token=base.unk_token,
                                   chat_template=base.chat_template)


def make_models(size: str, work: Path) -> tuple[Path, Path]:
    """Megatron checkpoints of a random policy and a random RM with a value head of ``size`` (made once)."""
    from megatron_save.checkpoint.convert import convert_hf_to_megatron
    from megatron_save.testing import save_tiny_hf_model

    out = {}
    for role, reward_model, seed in (("policy", False, 1), ("reward", True, 2)):
        target = work / size / f"{role}_megatron"
        if not (target / "megatron_save.json").exists():
            shape = shape_overrides(size)
            hf = save_tiny_hf_model("llama", work / size / f"{role}_hf", reward_model=reward_model, seed=seed,
                                    value_head=reward_model, **shape)
            wide_tokenizer(shape["vocab_size"]).save_pretrained(hf)
            convert_hf_to_megatron(hf, target)
        out[role] = target
    return out["policy"], out["reward"]


def planned_bytes(size: str, length: int, strategy: str) -> dict[str, int]:
    """The memory planner's bytes for one process of this run (fp32, local spec, PyTorch SwiGLU, TP 1)."""
    from megatron_save.planning import MemoryLayout, architecture_from_hf, plan_memory
    from megatron_save.testing import tiny_hf_config

    policy = architecture_from_hf(tiny_hf_config("llama", **shape_overrides(size)), reward_model=False)
    reward = architecture_from_hf(tiny_hf_config("llama", reward_model=True, **shape_overrides(size)),
                                  reward_model=True)
    layout = MemoryLayout(dtype="fp32", spec="local", fused_activation=False, micro_batch=4,
                          reward_micro_batch=GROUP, prompt_length=PROMPT_LENGTH, response_length=length,
                          rollout_batch=PROMPTS_PER_STEP * GROUP, reward_trained=strategy == "save",
                          value_head=True)
    return dict(plan_memory(policy, reward, layout).per_gpu_bytes)


def run_study(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "launches.jsonl"
    done = {(r["size"], r["length"], r["strategy"], r["round"]) for r in read_launches(log)}
    for round_index in range(args.rounds):
        for size in args.sizes:
            policy, reward = make_models(size, args.work)
            for length in args.lengths:
                order = STRATEGIES if round_index % 2 == 0 else STRATEGIES[::-1]
                for strategy in order:
                    if (size, length, strategy, round_index) in done:
                        continue
                    bench = argparse.Namespace(
                        nproc=1, config=CONFIG, policy=str(policy), reward=str(reward),
                        prompts=str(prompts_file(args.work)), steps=args.steps,
                        overrides=["parallel.tensor_model_parallel_size=1", f"prompts_per_step={PROMPTS_PER_STEP}",
                                   f"rollout.sampling.n={GROUP}", f"rollout.sampling.max_new_tokens={length}",
                                   f"reward.max_length={PROMPT_LENGTH + length + 32}",
                                   # no checkpoints: not what is measured, and a run's would fill the disk
                                   "save_every=0", "save_final_checkpoint=false"])
                    print(f"round {round_index + 1}/{args.rounds} {size} length {length}: {strategy}", flush=True)
                    run_dir = args.work / "runs" / f"{size}_{length}_{strategy}_{round_index}"
                    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted launch's leftovers: a run refuses them
                    load_before, start = os.getloadavg(), time.time()
                    records = launch(bench, strategy, run_dir)
                    entry = {"size": size, "length": length, "strategy": strategy, "round": round_index,
                             "wall_s": time.time() - start, "load_before": load_before,
                             "load_after": os.getloadavg(), "records": records}
                    with log.open("a") as f:
                        f.write(json.dumps(entry) + "\n")
                    shutil.rmtree(run_dir, ignore_errors=True)  # its records are in launches.jsonl now
                    summarize(args)


def prompts_file(work: Path) -> Path:
    path = work / "data" / "prompts.jsonl"
    if not path.exists():
        from megatron_save.testing.synthetic import synthetic_prompts, write_jsonl

        write_jsonl(synthetic_prompts(64, seed=3), path)
    return path


def read_launches(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def mean_of(records: list[dict], name: str) -> float | None:
    values = [r[name] for r in records if r.get(name) is not None]
    return statistics.fmean(values) if values else None


def spread(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)} \
        if values else None


def cell_summary(launches: list[dict], size: str, length: int) -> dict:
    """Per cell: paired SAVE / GRPO ratios over rounds, each strategy's median phase seconds and shares, the plan."""
    by_round: dict[int, dict[str, list[dict]]] = {}
    for entry in launches:
        if entry["size"] == size and entry["length"] == length:
            by_round.setdefault(entry["round"], {})[entry["strategy"]] = entry["records"]
    pairs = [r for r in by_round.values() if all(s in r for s in STRATEGIES)]

    def ratios(name: str) -> list[float]:
        out = []
        for pair in pairs:
            grpo, save = mean_of(pair["frozen"], name), mean_of(pair["save"], name)
            if grpo and save is not None:
                out.append(save / grpo)
        return out

    phases = sorted({k for r in by_round.values() for rs in r.values() for rec in rs for k in rec
                     if k.startswith("time/") and k != "time/step_s"})
    strategies = {}
    for strategy in STRATEGIES:
        runs = [r[strategy] for r in by_round.values() if strategy in r]
        step = [m for rs in runs if (m := mean_of(rs, "time/step_s")) is not None]
        rss = [m for rs in runs if (m := mean_of(rs, "memory/host_peak_rss_gib")) is not None]
        phase_s = {p: statistics.median(v) for p in phases
                   if (v := [m for rs in runs if (m := mean_of(rs, p)) is not None])}
        total = statistics.median(step) if step else None
        strategies[strategy] = {
            "launches": len(runs), "step_s": spread(step), "host_peak_rss_gib": spread(rss),
            "phase_s": phase_s, "phase_share": {p: s / total for p, s in phase_s.items()} if total else {},
            "planned_gib": planned_bytes(size, length, strategy)["total"] / GIB,
            "tokens_per_s": spread([m for rs in runs
                                    if (m := mean_of(rs, "throughput/response_tokens_per_s")) is not None]),
        }
    return {"size": size, "length": length, "params_shape": shape_overrides(size), "rounds_paired": len(pairs),
            "step_time_ratio": spread(ratios("time/step_s")),
            "host_peak_rss_ratio": spread(ratios("memory/host_peak_rss_gib")),
            "planned_ratio": strategies["save"]["planned_gib"] / strategies["frozen"]["planned_gib"],
            "strategies": strategies}


def parameters(size: str) -> int:
    from megatron_save.planning import architecture_from_hf
    from megatron_save.testing import tiny_hf_config

    arch = architecture_from_hf(tiny_hf_config("llama", **shape_overrides(size)), reward_model=False)
    attention = arch.hidden * arch.head_dim * (arch.heads + 2 * arch.kv_heads) + arch.heads * arch.head_dim * arch.hidden
    return arch.vocab * arch.hidden + arch.layers * (attention + 3 * arch.hidden * arch.ffn + 2 * arch.hidden)


def fmt(cell: dict | None, digits: int = 3) -> str:
    return "-" if not cell else f"{cell['median']:.{digits}f} [{cell['min']:.{digits}f}-{cell['max']:.{digits}f}]"


def summarize(args: argparse.Namespace) -> None:
    launches = read_launches(args.out / "launches.jsonl")
    sizes = [s for s in SIZES if any(e["size"] == s for e in launches)]
    lengths = sorted({e["length"] for e in launches})
    cells = [cell_summary(launches, s, n) for s in sizes for n in lengths]
    loads = [x for e in launches for x in (e["load_before"][0], e["load_after"][0])]
    provenance = current_provenance()
    payload = {"provenance": provenance.as_dict(), "config": CONFIG, "prompts_per_step": PROMPTS_PER_STEP,
               "group_size": GROUP, "vocab": VOCAB, "launches": len(launches),
               "load_average_1min": spread(loads), "cells": cells}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# SAVE / GRPO cost against model size (CPU)", "", "```", provenance.as_text(),
             f"launches: {len(launches)}, load average (1 min) over launches: {fmt(spread(loads), 2)} "
             f"on {provenance.cpu_count} cores", "```", "",
             f"Stage 3 from `{CONFIG}` on one process (TP 1, fp32), {PROMPTS_PER_STEP} prompts x G={GROUP} a step, "
             "random Llama-shaped policy and RM with a value head, vocabulary 49152 (tied). Ratios are SAVE / GRPO "
             "(reward.strategy=save / frozen), median [min-max] over paired rounds; memory is rank 0's peak host "
             "RSS (the whole process) against the planner's bytes for the same run.", "",
             "| size | params | response tokens | rounds | step time SAVE/GRPO | GRPO step s | SAVE step s "
             "| peak RSS SAVE/GRPO | GRPO RSS GiB | SAVE RSS GiB | planned GRPO GiB | planned SAVE GiB "
             "| planned SAVE/GRPO |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        g, s = c["strategies"]["frozen"], c["strategies"]["save"]
        lines.append(f"| {c['size']} | {parameters(c['size']) / 1e6:.1f}M | {c['length']} | {c['rounds_paired']} "
                     f"| {fmt(c['step_time_ratio'])} | {fmt(g['step_s'], 2)} | {fmt(s['step_s'], 2)} "
                     f"| {fmt(c['host_peak_rss_ratio'])} | {fmt(g['host_peak_rss_gib'], 2)} "
                     f"| {fmt(s['host_peak_rss_gib'], 2)} | {g['planned_gib']:.2f} | {s['planned_gib']:.2f} "
                     f"| {c['planned_ratio']:.3f} |")
    lines += ["", "Each phase's share of the step (median seconds over launches / median step time):", ""]
    phases = sorted({p for c in cells for st in c["strategies"].values() for p in st["phase_s"]})
    lines.append("| size | response tokens | strategy | " + " | ".join(p[5:-2] for p in phases) + " |")
    lines.append("|---|---|---|" + "---|" * len(phases))
    for c in cells:
        for strategy, st in c["strategies"].items():
            shares = [f"{st['phase_share'][p]:.1%}" if p in st["phase_share"] else "-" for p in phases]
            lines.append(f"| {c['size']} | {c['length']} | {strategy} | " + " | ".join(shares) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder of launches.jsonl and results.md / .json")
    parser.add_argument("--sizes", default="h256,h384,h576x15,smollm2-135m",
                        help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--lengths", default="8,32", help="comma-separated rollout.sampling.max_new_tokens")
    parser.add_argument("--rounds", type=int, default=3, help="frozen / save pairs per cell")
    parser.add_argument("--steps", type=int, default=2, help="steps per launch (the first is warm-up)")
    parser.add_argument("--work", type=Path, default=Path("outputs/cost_vs_size"),
                        help="models, data and run folders (reused: models are made once)")
    parser.add_argument("--summarize", action="store_true", help="only rewrite results.md / .json")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    args.sizes = args.sizes.split(",")
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes {','.join(unknown)}: choose from {', '.join(SIZES)}")
    args.lengths = [int(n) for n in args.lengths.split(",")]
    if args.summarize:
        summarize(args)
        return
    if args.steps < 2:
        parser.error("--steps must be >= 2: the first step of each launch is warm-up")
    run_study(args)


if __name__ == "__main__":
    sys.exit(main())
