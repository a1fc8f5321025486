"""Peak host memory of conversion per rank, as a fraction of the model's bytes and of one layer's bytes.

    python tools/bench_conversion_memory.py --layers 8 16 --hidden 1024 --layouts 1x1 1x2 1x4 2x2 \
        --export-ranks 1 2 4 [--json FILE]

For each depth, a random model of the family (fp32, the tiny tokenizer's 128-row vocabulary, so the layers are
nearly all of it) is written as HF safetensors, converted HF -> Megatron under torchrun at each layout TPxPP, and
exported back to HF under torchrun on each number of processes (one: the whole model; two or more: streamed part
by part). Every rank records its peak resident memory above what it held just before the conversion began (Linux
VmHWM, reset through /proc/self/clear_refs after imports and process-group start); the largest rank's peak is
printed over the model's bytes and over one layer's bytes, and each export is checked to give back every tensor.

glibc raises its mmap threshold each time a large block is freed, so later blocks of that size come from the heap
and part of a freed layer can stay resident; ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment (passed on to
every rank) pins the threshold, and the streamed export's peak then barely moves with depth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def run_worker(args: argparse.Namespace) -> None:
    """One rank of one conversion: starts the layout, resets the peak, converts, writes its peak extra bytes."""
    import torch.distributed as dist

    from megatron_save.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_save.config import ParallelConfig
    from megatron_save.distributed import init_distributed, shutdown_distributed

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              backend="gloo")
    init_distributed(parallel)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    if args.worker == "import":
        convert_hf_to_megatron(args.source, args.target, parallel=parallel)
    else:
        convert_megatron_to_hf(args.source, args.target, max_shard_bytes=args.max_shard_bytes)
    peak_extra = (_status_kib("VmHWM") - before) * 1024
    Path(f"{args.record}-rank{dist.get_rank()}.json").write_text(json.dumps({"peak_extra_bytes": peak_extra}))
    shutdown_distributed()


def _torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), *args]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")


def _model_bytes(hf_dir: Path) -> tuple[int, int]:
    """(all weights, layer 0's weights) in bytes."""
    from megatron_save.checkpoint.safetensors_io import SafetensorsReader

    reader = SafetensorsReader(hf_dir)
    sizes = {name: reader.get(name).nbytes for name in reader.names()}
    return sum(sizes.values()), sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))


def _same_tensors(a: Path, b: Path) -> bool:
    import torch

    from megatron_save.checkpoint.safetensors_io import SafetensorsReader

    left, right = SafetensorsReader(a), SafetensorsReader(b)
    return left.names() == right.names() and all(torch.equal(left.get(n), right.get(n)) for n in left.names())


def _largest_peak(record: Path) -> int:
    return max(json.loads(p.read_text())["peak_extra_bytes"] for p in record.parent.glob(f"{record.name}-rank*.json"))


def measure(family: str, layers: int, hidden: int, layouts: list[tuple[int, int]], export_ranks: list[int],
            max_shard_bytes: int, root: Path) -> list[dict]:
    """One row per import layout and per export process count: the largest rank's peak extra bytes."""
    from megatron_save.testing import save_tiny_hf_model

    hf_dir = save_tiny_hf_model(family, root / f"{family}-{layers}-hf", seed=0, num_hidden_layers=layers,
                                hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=16,
                                num_key_value_heads=4, head_dim=hidden // 16)
    model_bytes, layer_bytes = _model_bytes(hf_dir)
    shape = {"family": family, "layers": layers, "hidden": hidden, "model_bytes": model_bytes,
             "layer_bytes": layer_bytes}
    rows = []
    for tp, pp in layouts:
        ckpt, record = root / f"{family}-{layers}-tp{tp}pp{pp}", root / f"import-{layers}-tp{tp}pp{pp}"
        _torchrun(tp * pp, "--worker", "import", "--source", str(hf_dir), "--target", str(ckpt), "--tp", str(tp),
                  "--pp", str(pp), "--record", str(record))
        rows.append({**shape, "direction": "import", "layout": f"TP{tp}xPP{pp}", "peak_bytes": _largest_peak(record)})
    for ranks in export_ranks:
        out, record = root / f"{family}-{layers}-export{ranks}", root / f"export-{layers}-{ranks}"
        _torchrun(ranks, "--worker", "export", "--source", str(ckpt), "--target", str(out), "--record", str(record),
                  "--max-shard-bytes", str(max_shard_bytes))
        rows.append({**shape, "direction": "export", "layout": f"{ranks} process{'es' if ranks > 1 else ''}",
                     "max_shard_bytes": max_shard_bytes, "peak_bytes": _largest_peak(record),
                     "exact": _same_tensors(hf_dir, out)})
    return rows


def _layout(text: str) -> tuple[int, int]:
    tp, _, pp = text.partition("x")
    return int(tp), int(pp)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama", help="tiny-model family (megatron_save.testing)")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16], help="depths to measure")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (16 heads, 4 KV groups)")
    parser.add_argument("--layouts", type=_layout, nargs="+", default=[(1, 1), (1, 2), (1, 4)],
                        help="TPxPP layouts, e.g. 1x1 1x4 2x2")
    parser.add_argument("--export-ranks", type=int, nargs="+", default=[1, 2, 4],
                        help="process counts of the export (1: whole model; 2 or more: streamed)")
    parser.add_argument("--max-shard-bytes", type=int, default=64 * 2**20, help="export shard size")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--worker", choices=["import", "export"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for layers in args.layers:
            rows += measure(args.family, layers, args.hidden, args.layouts, args.export_ranks, args.max_shard_bytes,
                            Path(root))
    print(f"{'layers':>6} {'direction':>9} {'layout':>12} {'model MB':>9} {'layer MB':>9} {'peak MB':>8} "
          f"{'peak/model':>10} {'peak/layer':>10} exact")
    for row in rows:
        print(f"{row['layers']:>6} {row['direction']:>9} {row['layout']:>12} {row['model_bytes'] / 2**20:>9.1f} "
              f"{row['layer_bytes'] / 2**20:>9.1f} {row['peak_bytes'] / 2**20:>8.1f} "
              f"{row['peak_bytes'] / row['model_bytes']:>10.2f} {row['peak_bytes'] / row['layer_bytes']:>10.2f} "
              f"{row.get('exact', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if not all(row.get("exact", True) for row in rows):
        raise SystemExit("an export did not give back every tensor exactly")


if __name__ == "__main__":
    main()
