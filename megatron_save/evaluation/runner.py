"""Evaluates one benchmark: rows -> scores (a model or a scores file) -> official numbers -> output files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from megatron_save.evaluation.benchmarks import BENCHMARKS, PAPER_ORDER, Benchmark, read_scores_file
from megatron_save.utils.logging import get_logger

logger = get_logger(__name__)

# conversations -> one score each
ConversationScorer = Callable[[list], list[float]]


def score_rows(benchmark: Benchmark, rows: list[dict], scorer: ConversationScorer) -> list[list[float]]:
    """All responses of all rows scored in one pass (so shared responses are scored once), then regrouped."""
    per_row = [benchmark.responses(row) for row in rows]
    flat = scorer([messages for conversations in per_row for messages in conversations])
    scores, start = [], 0
    for conversations in per_row:
        scores.append(flat[start : start + len(conversations)])
        start += len(conversations)
    return scores


def summarize(benchmark: Benchmark, rows: list[dict], scores: list[list[float]], source: str = "",
              **rule_options) -> dict:
    """``{"benchmark", "score" (0-100), "subsets", "examples", "partial", "source"}`` by the official rule.

    ``partial`` is true when subsets the official score averages over are missing (logged as a warning).
    """
    if not rows:
        raise ValueError(f"{benchmark.name}: no examples to score")
    score, subsets = benchmark.rule(rows, scores, **rule_options)
    partial = bool(subsets.get("partial", False))
    if partial:
        logger.warning("%s: partial data, the score averages only what is present (missing: %s)", benchmark.name,
                       ", ".join(subsets.get("missing_subsets", [])) or "-")
    return {"benchmark": benchmark.name, "score": score, "subsets": subsets, "examples": len(rows),
            "partial": partial, "source": source}


def write_outputs(benchmark: Benchmark, rows: list[dict], scores: list[list[float]], summary: dict,
                  out_dir: str | Path) -> None:
    """DIR/<NAME>.scores.jsonl (key fields + scores per example) and DIR/<NAME>.summary.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{benchmark.name}.scores.jsonl", "w") as handle:
        for row, row_scores in zip(rows, scores):
            record = {field: row[field] for field in benchmark.key_fields()}
            handle.write(json.dumps({**record, "scores": row_scores}) + "\n")
    (out_dir / f"{benchmark.name}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def rescore(benchmark: Benchmark, rows: list[dict], scores_file: str | Path, **rule_options) -> tuple[list, dict]:
    """Numbers from an existing scores file instead of a model."""
    scores = read_scores_file(benchmark, rows, scores_file)
    return scores, summarize(benchmark, rows, scores, source=str(scores_file), **rule_options)


def results_table(runs: dict[str, dict[str, float]]) -> str:
    """Markdown in the paper's Table 1 layout: one row per run, the six benchmarks and their average.

    ``runs``: run name -> {benchmark name: score}. A missing benchmark shows as "-", and the average is then
    over the benchmarks present, marked with *.
    """
    lines = results_header() + [results_row(run, results) for run, results in runs.items()]
    if any(len(results) < len(PAPER_ORDER) for results in runs.values()):
        lines += ["", PARTIAL_NOTE]
    return "\n".join(lines) + "\n"


PARTIAL_NOTE = "\\* average over the benchmarks present only"


def results_header() -> list[str]:
    """The two header lines of the Table 1 layout: Method, the six benchmarks in the paper's order, Average."""
    titles = [BENCHMARKS[name].title for name in PAPER_ORDER]
    return ["| Method | " + " | ".join(titles) + " | Average |", "|---" * (len(titles) + 2) + "|"]


def results_row(run: str, results: dict[str, float]) -> str:
    """One line of the Table 1 layout (see results_table)."""
    present = [results[name] for name in PAPER_ORDER if name in results and not math.isnan(results[name])]
    cells = [f"{results[name]:.1f}" if name in results else "-" for name in PAPER_ORDER]
    average = f"{sum(present) / len(present):.1f}" if present else "-"
    if present and len(present) < len(PAPER_ORDER):
        average += "*"
    return f"| {run} | " + " | ".join(cells) + f" | {average} |"


def read_summaries(out_dir: str | Path) -> dict[str, float]:
    """{benchmark: score} from the ``<NAME>.summary.json`` files of one output directory."""
    return {json.loads(p.read_text())["benchmark"]: json.loads(p.read_text())["score"]
            for p in sorted(Path(out_dir).glob("*.summary.json"))}
