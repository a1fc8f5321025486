"""Tiny stand-ins for the paper recipe's data, in the released formats and file layout that
examples/paper/reproduce.sh reads: UltraFeedback, ultrafeedback_binarized, the six reward-model benchmarks and the
two policy benchmarks' prompts. The texts are random letters; only the formats and the layout are real."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_save.testing.synthetic import write_jsonl

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Subset and domain names of the released data (evaluation/scoring.py reads them; this layer sits below it).
_REWARDBENCH_SUBSETS = ("alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "math-prm", "hep-python")
_REWARDBENCH2_SUBSETS = ("Factuality", "Precise IF", "Math", "Safety", "Focus")
_RM_BENCH_DOMAINS = ("chat", "code", "math", "safety-refuse")


@dataclass(frozen=True)
class PaperRecipeData:
    """Where write_paper_recipe_data put each input (reproduce.sh's PROMPT_DATA, PREFERENCE_DATA, BENCHMARK_DIR)."""

    prompt_data: Path
    """UltraFeedback rows: ``instruction`` and ``completions`` [{"response", "model"}]."""
    preference_data: Path
    """ultrafeedback_binarized rows: ``prompt``, ``chosen`` / ``rejected`` chat message lists."""
    benchmark_dir: Path
    """The six RM benchmarks and the AlpacaEval / Arena-Hard prompts, laid out as README's evaluation example."""
    long_instructions: tuple[str, ...]
    """The instructions with a completion longer than ``long_response_chars`` (what F.1's selection keeps)."""


def _text(rng: random.Random, length: int) -> str:
    words, size = [], 0
    while size < length:
        words.append("".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 6))))
        size += len(words[-1]) + 1
    return " ".join(words)[:length]


def _write_parquet(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _chat(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def write_paper_recipe_data(root: str | Path, instructions: int = 16, long_response_chars: int = 60,
                            seed: int = 0) -> PaperRecipeData:
    """Writes the recipe's inputs under ``root``. Half of the ``instructions`` have a completion longer than
    ``long_response_chars`` characters (a character-level tokenizer's tokens), the rest only short ones; one
    instruction repeats and one is empty, as F.1's selection must count; every long instruction has an
    ultrafeedback_binarized pair, and so do two short ones (which the matched pairs leave out)."""
    rng = random.Random(seed)
    root = Path(root)
    prompts = [f"task {i}: {_text(rng, 20)}" for i in range(instructions)]
    long = prompts[::2]
    ultrafeedback = [{"source": "synthetic", "instruction": prompt,
                      "completions": [{"model": f"m{k}", "response": _text(rng, rng.randint(10, long_response_chars))}
                                      for k in range(3)]
                      + ([{"model": "m3", "response": _text(rng, long_response_chars + 20)}] if prompt in long else [])}
                     for prompt in prompts]
    ultrafeedback += [dict(ultrafeedback[0]), {"source": "synthetic", "instruction": "  ",
                                               "completions": [{"model": "m0", "response": _text(rng, 90)}]}]
    binarized = [{"prompt": prompt, "prompt_id": f"{i:04d}", "score_chosen": 8.0, "score_rejected": 3.0,
                  "chosen": _chat(prompt, _text(rng, 30)), "rejected": _chat(prompt, _text(rng, 30))}
                 for i, prompt in enumerate(long + prompts[1:4:2])]
    bench = root / "benchmarks"
    _write_benchmarks(bench, rng)
    return PaperRecipeData(_write_parquet(ultrafeedback, root / "ultrafeedback" / "train.parquet"),
                           _write_parquet(binarized, root / "ultrafeedback_binarized" / "train_prefs.parquet"),
                           bench, tuple(long))


def _write_benchmarks(bench: Path, rng: random.Random) -> None:
    """Six RM benchmarks (parquet where the release is parquet, json / jsonl otherwise) and the policy prompts."""
    def pair_texts():
        return _text(rng, 12), _text(rng, rng.randint(8, 30)), _text(rng, rng.randint(8, 30))

    rewardbench = [dict(zip(("prompt", "chosen", "rejected"), pair_texts()), id=i,
                        subset=_REWARDBENCH_SUBSETS[i % len(_REWARDBENCH_SUBSETS)]) for i in range(10)]
    _write_parquet(rewardbench, bench / "reward-bench" / "filtered.parquet")
    rewardbench2 = []
    for i, subset in enumerate(_REWARDBENCH2_SUBSETS * 2):
        rewardbench2.append({"id": str(i), "prompt": _text(rng, 12), "subset": subset, "num_correct": 1,
                             "chosen": [_text(rng, 20)], "rejected": [_text(rng, 20) for _ in range(3)]})
    for n in range(2):  # Ties: a reference prompt with one correct answer, a tied one with two
        rewardbench2.append({"id": f"ref:{n}", "prompt": _text(rng, 12), "subset": "Ties", "num_correct": 1,
                             "chosen": [_text(rng, 20)], "rejected": [_text(rng, 20), _text(rng, 20)]})
        rewardbench2.append({"id": f"tied:{n}", "prompt": _text(rng, 12), "subset": "Ties", "num_correct": 2,
                             "chosen": [_text(rng, 20), _text(rng, 20)], "rejected": [_text(rng, 20)]})
    _write_parquet(rewardbench2, bench / "reward-bench-2" / "test.parquet")
    rm_bench = [{"id": i, "prompt": _text(rng, 12), "domain": domain,
                 "chosen": [_text(rng, 20) for _ in range(3)], "rejected": [_text(rng, 20) for _ in range(3)]}
                for i, domain in enumerate(_RM_BENCH_DOMAINS * 2)]
    (bench / "RM-Bench").mkdir(parents=True, exist_ok=True)
    (bench / "RM-Bench" / "total_dataset.json").write_text(json.dumps(rm_bench))
    preference = [dict(zip(("prompt", "response_1", "response_2"), pair_texts()), question_id=f"q{i}",
                       winner=("model_a", "model_b", "tie")[i % 3], hard_prompt=i % 2 == 0) for i in range(9)]
    _write_parquet(preference, bench / "ppe" / "human_preference_v1.parquet")
    for name in ("mmlu_pro_best_of_k", "math_best_of_k"):
        rows = [{"question_id": f"{name}-{i}", "prompt": _text(rng, 12), "scores": [True, False, False],
                 "sampled_conflict_pairs": [[0, 1], [0, 2]],
                 **{f"response_{k}": _text(rng, 20) for k in (1, 2, 3)}} for i in range(3)]
        write_jsonl(rows, bench / "ppe" / "correctness" / f"{name}.jsonl")
    judgebench = [dict(zip(("question", "response_A", "response_B"), pair_texts()), pair_id=f"p{i}",
                       label=("A>B", "B>A")[i % 2], source=("mmlu-pro-math", "livebench-reasoning")[i % 2])
                  for i in range(8)]
    write_jsonl(judgebench, bench / "judgebench" / "gpt.jsonl")
    alpaca = [{"dataset": "helpful_base", "instruction": _text(rng, 16)} for _ in range(3)]
    (bench / "alpaca_eval").mkdir(parents=True, exist_ok=True)
    (bench / "alpaca_eval" / "alpaca_eval.json").write_text(json.dumps(alpaca))
    write_jsonl([{"uid": f"u{i}", "category": "hard_prompt", "prompt": _text(rng, 16)} for i in range(3)],
                bench / "arena-hard-v2.0" / "question.jsonl")
