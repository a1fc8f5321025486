"""The six reward-model benchmarks: required fields, which responses each example scores, and which rule."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_save.data.chat import Messages, conversation
from megatron_save.data.loading import load_rows, require_fields
from megatron_save.evaluation import scoring


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark's rows are read and scored."""

    name: str
    """Name used on the command line and in output file names."""
    title: str
    """Column title in the results table."""
    id_field: str
    """The example's own id field, written to the scores file."""
    fields: tuple[str, ...]
    """Fields every row must have."""
    responses: Callable[[dict], list[Messages]]
    """The conversations of one row to score, in the benchmark's response order."""
    rule: Callable[..., tuple[float, dict]]
    """The official scoring rule (``megatron_save.evaluation.scoring``)."""
    hub_name: str
    """Where the data lives on the hub (used when --data is a hub name)."""
    hub_split: str
    """The split papers report."""
    extra_key_fields: tuple[str, ...] = ()
    """Fields besides the id that tell examples apart (PPE correctness: ``set``, as ids repeat across sets)."""

    def key_fields(self) -> tuple[str, ...]:
        """Fields written to each scores-file line to identify the example."""
        return (*self.extra_key_fields, self.id_field)

    def key(self, row: dict) -> tuple[str, ...]:
        """The example's identity in a scores file."""
        return tuple(str(row[field]) for field in self.key_fields())


def _pair(prompt: str, first: str, second: str) -> Callable[[dict], list[Messages]]:
    return lambda row: [conversation(row[prompt], row[first]), conversation(row[prompt], row[second])]


def _chosen_then_rejected(expected: int | None) -> Callable[[dict], list[Messages]]:
    def responses(row: dict) -> list[Messages]:
        chosen, rejected = list(row["chosen"]), list(row["rejected"])
        if "num_correct" in row and row["num_correct"] != len(chosen):
            raise ValueError(f"row {row.get('id')}: num_correct={row['num_correct']} but {len(chosen)} chosen responses")
        if expected is not None and (len(chosen), len(rejected)) != (expected, expected):
            raise ValueError(f"row {row.get('id')}: expected {expected} chosen and {expected} rejected responses, "
                             f"got {len(chosen)} and {len(rejected)}")
        return [conversation(row["prompt"], response) for response in chosen + rejected]

    return responses


def _ppe_correctness_responses(row: dict) -> list[Messages]:
    count = len(row["scores"])
    missing = [f"response_{k}" for k in range(1, count + 1) if row.get(f"response_{k}") is None]
    if missing:
        raise ValueError(f"row {row.get('question_id')}: {len(row['scores'])} labels but no {missing[0]}")
    return [conversation(row["prompt"], row[f"response_{k}"]) for k in range(1, count + 1)]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("rewardbench", "RewardBench", "id", ("id", "prompt", "chosen", "rejected", "subset"),
              _pair("prompt", "chosen", "rejected"), scoring.rewardbench, "allenai/reward-bench", "filtered"),
    Benchmark("rewardbench2", "RewardBench 2", "id", ("id", "prompt", "chosen", "rejected", "num_correct", "subset"),
              _chosen_then_rejected(None), scoring.rewardbench2, "allenai/reward-bench-2", "test"),
    Benchmark("rm-bench", "RM-Bench", "id", ("id", "prompt", "chosen", "rejected", "domain"),
              _chosen_then_rejected(3), scoring.rm_bench, "THU-KEG/RM-Bench", "train"),
    Benchmark("ppe-preference", "PPE Preference", "question_id",
              ("question_id", "prompt", "response_1", "response_2", "winner"),
              _pair("prompt", "response_1", "response_2"), scoring.ppe_preference,
              "lmarena-ai/PPE-Human-Preference-V1", "test"),
    Benchmark("ppe-correctness", "PPE Correctness", "question_id",
              ("question_id", "prompt", "scores", "sampled_conflict_pairs"),
              _ppe_correctness_responses, scoring.ppe_correctness, "lmarena-ai/PPE-MMLU-Pro-Best-of-K", "train",
              extra_key_fields=("set",)),
    Benchmark("judgebench", "JudgeBench", "pair_id",
              ("pair_id", "question", "response_A", "response_B", "label", "source"),
              _pair("question", "response_A", "response_B"), scoring.judgebench, "ScalerLab/JudgeBench", "gpt"),
)}
PAPER_ORDER = ("rewardbench", "rewardbench2", "rm-bench", "ppe-preference", "ppe-correctness", "judgebench")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; ValueError listing the choices otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(PAPER_ORDER)}")
    return BENCHMARKS[name]


def load_benchmark(benchmark: Benchmark, source: str) -> list[dict]:
    """Rows of a local file (json / jsonl / parquet), a directory of such files, or a hub dataset, checked for the
    benchmark's fields (ValueError names the file and field). PPE correctness rows get ``set`` = the file name."""
    path = Path(source)
    files = sorted(p for p in path.iterdir() if p.suffix in _DATA_SUFFIXES) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise FileNotFoundError(f"{source}: no {'/'.join(_DATA_SUFFIXES)} files in this directory")
    rows = []
    for file in files:
        table = load_rows(str(file), benchmark.hub_split)
        require_fields(table, benchmark.fields, str(file))
        set_name = file.stem if file.suffix in _DATA_SUFFIXES else str(source).split("/")[-1]
        rows += [{**row, "set": set_name} if benchmark.name == "ppe-correctness" else dict(row) for row in table]
    seen = set()
    for row in rows:
        key = benchmark.key(row)
        if key in seen:
            raise ValueError(f"{source}: example {'/'.join(key)} appears twice")
        seen.add(key)
    return rows


def read_scores_file(benchmark: Benchmark, rows: list[dict], path: str | Path) -> list[list[float]]:
    """Scores per row from a ``<NAME>.scores.jsonl`` file, matched by the example's key fields.

    ValueError names the file and the first example that is missing, has the wrong number of scores, or a
    score that is not a finite number.
    """
    fields = benchmark.key_fields()
    by_key = {}
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON line ({error})") from error
            if any(field not in record for field in fields) or "scores" not in record:
                raise ValueError(f"{path}:{line_number}: needs {', '.join(fields)} and 'scores'")
            key = tuple(str(record[field]) for field in fields)
            if key in by_key:
                raise ValueError(f"{path}:{line_number}: a second line for {'/'.join(key)}")
            by_key[key] = [float(s) for s in record["scores"]]
    scores = []
    for row in rows:
        key = benchmark.key(row)
        name = "/".join(key)
        if key not in by_key:
            raise ValueError(f"{path}: no scores for {name}")
        expected = len(benchmark.responses(row))
        if len(by_key[key]) != expected:
            raise ValueError(f"{path}: {name} has {len(by_key[key])} scores, expected {expected}")
        if not all(math.isfinite(score) for score in by_key[key]):
            raise ValueError(f"{path}: {name} has a score that is not a finite number: {by_key[key]}")
        scores.append(by_key[key])
    return scores
