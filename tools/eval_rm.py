"""Scores reward-model benchmarks with their official rules and writes scores, summaries and a results table.

    python tools/eval_rm.py --benchmark rewardbench --data DATA [--benchmark NAME --data DATA ...] \\
        (--ckpt CKPT_DIR | --hf-model HF_DIR | --scores FILE [--scores FILE ...]) --out OUT_DIR
    torchrun --nproc-per-node 4 tools/eval_rm.py ... --ckpt CKPT_DIR --tp 2 --pp 2 --out OUT_DIR
    python tools/eval_rm.py --table OUT_DIR [OUT_DIR ...]     # the paper's Table 1 layout, runs side by side

NAME: rewardbench, rewardbench2, rm-bench, ppe-preference, ppe-correctness, judgebench. DATA: a json / jsonl /
parquet file, a directory of them (PPE correctness: one file per set), or a hub dataset name on a cluster.
Writes OUT_DIR/<NAME>.scores.jsonl, OUT_DIR/<NAME>.summary.json and OUT_DIR/results.md.
"""

import argparse
from pathlib import Path

from megatron_save.evaluation.benchmarks import PAPER_ORDER, get_benchmark, load_benchmark
from megatron_save.evaluation.runner import read_summaries, rescore, results_table, score_rows, summarize, write_outputs
from megatron_save.evaluation.scorer import hf_sequence_scorer, megatron_sequence_scorer, score_conversations


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", action="append", default=[], choices=PAPER_ORDER)
    parser.add_argument("--data", action="append", default=[], help="one per --benchmark, in the same order")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ckpt", help="megatron-save reward-model checkpoint (any TP / PP)")
    source.add_argument("--hf-model", help="HF *ForSequenceClassification directory (reference scoring)")
    source.add_argument("--scores", action="append", help="existing <NAME>.scores.jsonl, one per --benchmark")
    source.add_argument("--table", nargs="+", metavar="OUT_DIR", help="only print the results table of these runs")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--name", help="row name in the results table (default: the model directory's name)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=2048, help="left truncation, as reward-bench")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ppe-tie-label", choices=["skip", "wrong"], default="skip",
                        help="PPE preference rows whose winner is neither model (unconfirmed official rule)")
    return parser


def parse_args() -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args()
    if args.table:
        return args
    if not args.benchmark or len(args.benchmark) != len(args.data):
        parser.error("give each --benchmark its --data, in the same order")
    if not (args.ckpt or args.hf_model or args.scores) or not args.out:
        parser.error("give --out and one of --ckpt, --hf-model, --scores")
    if args.scores and len(args.scores) != len(args.benchmark):
        parser.error("give one --scores file per --benchmark")
    if len(set(args.benchmark)) != len(args.benchmark):
        parser.error("each --benchmark may appear once (a directory of files serves PPE correctness's sets)")
    return args


def make_scorer(args: argparse.Namespace):
    if args.scores:
        return None
    if args.ckpt:
        from megatron_save.checkpoint import read_checkpoint_meta
        from megatron_save.config import ParallelConfig
        from megatron_save.distributed import ParallelLayoutError, init_distributed
        from megatron_save.models.gpt_config import model_shape

        parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
        try:
            init_distributed(parallel, model_shape(read_checkpoint_meta(args.ckpt)[1], args.ckpt))
        except ParallelLayoutError as error:  # before any process group exists: one line on every rank
            raise SystemExit(f"eval_rm: {error}") from None
        score_sequences, tokenizer = megatron_sequence_scorer(args.ckpt, args.batch_size)
    else:
        score_sequences, tokenizer = hf_sequence_scorer(args.hf_model, args.batch_size)
    return lambda conversations: score_conversations(conversations, tokenizer, score_sequences, args.max_length)


def main() -> None:
    args = parse_args()
    if args.table:
        print(results_table({Path(d).name: read_summaries(d) for d in args.table}), end="")
        return
    import torch.distributed as dist

    scorer = make_scorer(args)
    writer = not dist.is_initialized() or dist.get_rank() == 0
    options = {"ppe-preference": {"tie_label": args.ppe_tie_label}}
    source = args.ckpt or args.hf_model
    results = {}
    for index, (name, data) in enumerate(zip(args.benchmark, args.data)):
        benchmark = get_benchmark(name)
        rows = load_benchmark(benchmark, data)
        if scorer is None:
            scores, summary = rescore(benchmark, rows, args.scores[index], **options.get(name, {}))
        else:
            scores = score_rows(benchmark, rows, scorer)
            summary = summarize(benchmark, rows, scores, source=source, **options.get(name, {}))
        results[name] = summary["score"]
        if writer:
            write_outputs(benchmark, rows, scores, summary, args.out)
            partial = " (partial data)" if summary["partial"] else ""
            print(f"{benchmark.title}: {summary['score']:.2f} over {len(rows)} examples{partial}")
    if writer:
        run = args.name or Path(source or args.out).name
        table = results_table({run: results})
        (Path(args.out) / "results.md").write_text(table)
        print(table, end="")
    if dist.is_initialized():
        from megatron_save.distributed import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    main()
