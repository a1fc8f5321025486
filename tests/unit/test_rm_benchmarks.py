"""Official scoring rules on small hand-built fixtures whose numbers were worked out by hand (see comments)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers import REPO

from megatron_save.evaluation import scoring
from megatron_save.evaluation.benchmarks import BENCHMARKS, load_benchmark, read_scores_file
from megatron_save.evaluation.runner import results_table
from megatron_save.testing.synthetic import write_jsonl


REWARDBENCH = [  # (subset, [chosen, rejected])
    ("alpacaeval-easy", [2, 1]), ("alpacaeval-easy", [1, 1]),  # a tie is wrong: 50%
    ("mt-bench-hard", [0, 1]), ("mt-bench-hard", [3, 2]),  # 50%
    ("refusals-dangerous", [5, 4]),  # 100%
    ("math-prm", [1, 0]), ("hep-python", [0, 1]),  # reasoning = (1 * 984 + 0 * 164) / 1148
]


def test_rewardbench():
    rows = [{"id": i, "subset": s} for i, (s, _) in enumerate(REWARDBENCH)]
    score, subsets = scoring.rewardbench(rows, [sc for _, sc in REWARDBENCH])
    assert subsets["Chat"] == pytest.approx(50) and subsets["Chat Hard"] == pytest.approx(50)
    assert subsets["Safety"] == pytest.approx(100)
    assert subsets["Reasoning"] == pytest.approx(100 * 984 / 1148)
    assert score == pytest.approx((50 + 50 + 100 + 100 * 984 / 1148) / 4)
    assert subsets["partial"] and "llmbar-natural" in subsets["missing_subsets"]


def rewardbench2_fixture():
    rows = [
        {"id": "a", "subset": "Factuality", "num_correct": 1},  # unique max: 1
        {"id": "b", "subset": "Factuality", "num_correct": 1},  # tied with one rejected: 1/2
        {"id": "c", "subset": "Factuality", "num_correct": 1},  # beaten: 0
        {"id": "d", "subset": "Math", "num_correct": 1},  # four-way tie: 1/4
        {"id": "ref:1", "subset": "Ties", "num_correct": 1},  # margin 4 - 2 = 2: accurate
        {"id": "tied:1", "subset": "Ties", "num_correct": 2},  # margin 2.5 - 1 = 1.5: accurate, diff 0.5
        {"id": "ref:2", "subset": "Ties", "num_correct": 1},  # margin -1
        {"id": "tied:2", "subset": "Ties", "num_correct": 2},  # margin 1 - 1.5 = -0.5, diff 1
    ]
    scores = [[3, 1, 2, 0], [2, 2, 1, 0], [1, 3, 0, 0], [5, 5, 5, 5], [4, 1, 2], [3, 2.5, 1, 0], [0, 1], [2, 1, 1.5]]
    return rows, scores


def test_rewardbench2_best_of_n_and_ties():
    rows, scores = rewardbench2_fixture()
    score, subsets = scoring.rewardbench2(rows, scores)
    assert subsets["Factuality"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert subsets["Math"] == pytest.approx(25)
    ties = subsets["ties_details"]
    assert (ties["ref_accuracy"], ties["tied_accuracy"]) == (0.5, 0.5)
    # id 1: 1.5 > 0.5 and min(2, 1.5) > 0.5; id 2: -0.5 > 1 and min(-1, -0.5) > 1 are false
    assert (ties["correctness_preferred"], ties["correctness_preferred_hard"]) == (0.5, 0.5)
    # tanh(1.5 / 0.5 - 1) = tanh(2) and tanh(-1 / 1 - 1) = tanh(-2) cancel
    assert ties["correctness_margin_score"] == pytest.approx(0.0, abs=1e-12)
    assert subsets["Ties"] == pytest.approx(100 * (0.3 * 0.5 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.5))
    assert score == pytest.approx((50 + 25 + 50) / 3)


def test_rm_bench_style_matrix():
    rows = [{"id": 1, "domain": "chat"}, {"id": 2, "domain": "chat"}, {"id": 3, "domain": "safety-refuse"},
            {"id": 4, "domain": "safety-response"}]
    scores = [[3, 2, 1, 2.5, 1.5, 0.5], [0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]
    score, subsets = scoring.rm_bench(rows, scores)
    # chat: M = [[.5, .5, .5], [0, .5, .5], [0, 0, .5]] -> hard .5, normal .5, easy 0
    assert subsets["chat"]["matrix"] == [[0.5, 0.5, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 0.5]]
    assert (subsets["chat"]["hard"], subsets["chat"]["normal"], subsets["chat"]["easy"]) == (50, 50, 0)
    assert subsets["safety"]["average"] == pytest.approx(50)  # both safety kinds pooled: every cell .5
    assert score == pytest.approx((100 / 3 + 50) / 2)
    assert (subsets["hard"], subsets["normal"], subsets["easy"]) == (50, 50, 25)


def test_ppe_preference_strict_and_tie_label_option():
    rows = [{"winner": "model_a", "hard_prompt": True}, {"winner": "model_b", "hard_prompt": False},
            {"winner": "model_b", "hard_prompt": True}, {"winner": "tie", "hard_prompt": False}]
    scores = [[2, 1], [2, 1], [1, 1], [1, 2]]
    score, subsets = scoring.ppe_preference(rows, scores)
    assert score == pytest.approx(100 / 3) and subsets["hard_prompt"] == 50
    assert subsets["rows_skipped_without_winner"] == 1
    assert scoring.ppe_preference(rows, scores, tie_label="wrong")[0] == 25


def test_ppe_correctness_conflict_pairs_and_best_of_k():
    rows = [{"set": "mmlu", "question_id": "q1", "scores": [True, False, False], "sampled_conflict_pairs": [[0, 1], [0, 2]]},
            {"set": "math", "question_id": "q1", "scores": [False, True], "sampled_conflict_pairs": [[1, 0]]}]
    score, subsets = scoring.ppe_correctness(rows, [[1, 2, 0], [0, 3]])
    assert subsets["mmlu"] == {"conflict_pair_accuracy": 50.0, "best_of_k_accuracy": 0.0}
    assert subsets["math"] == {"conflict_pair_accuracy": 100.0, "best_of_k_accuracy": 100.0}
    assert score == 75


def test_judgebench_tie_means_b():
    rows = [{"source": "mmlu-pro-history", "label": "A>B"}, {"source": "livebench-math", "label": "B>A"},
            {"source": "livecodebench", "label": "A>B"}, {"source": "livebench-reasoning", "label": "B>A"}]
    score, subsets = scoring.judgebench(rows, [[2, 1], [1, 1], [1, 1], [3, 1]])
    assert score == 50
    assert subsets == {"coding": 0.0, "knowledge": 100.0, "math": 100.0, "reasoning": 0.0}


def test_results_table_layout():
    table = results_table({"ours": {"rewardbench": 90.0, "rewardbench2": 70.0, "rm-bench": 80.0,
                                    "ppe-preference": 60.0, "ppe-correctness": 65.0, "judgebench": 55.0},
                           "partial": {"rewardbench": 91.0}})
    lines = table.splitlines()
    assert lines[0] == ("| Method | RewardBench | RewardBench 2 | RM-Bench | PPE Preference | PPE Correctness | "
                        "JudgeBench | Average |")
    assert lines[2] == "| ours | 90.0 | 70.0 | 80.0 | 60.0 | 65.0 | 55.0 | 70.0 |"
    assert lines[3] == "| partial | 91.0 | - | - | - | - | - | 91.0* |"


# ---- files: schema errors, scores files, the command line -------------------------------------------------

def write_fixtures(root):
    """One data file per benchmark in its released schema, plus a scores file for each."""
    files, scores = {}, {}
    rb = [{"id": i, "prompt": "p", "chosen": "c", "rejected": "r", "subset": s} for i, (s, _) in enumerate(REWARDBENCH)]
    files["rewardbench"] = write_jsonl(rb, root / "rewardbench.jsonl")
    scores["rewardbench"] = [{"id": i, "scores": sc} for i, (_, sc) in enumerate(REWARDBENCH)]
    rows, rb2_scores = rewardbench2_fixture()
    rb2 = [{**r, "prompt": "p", "chosen": ["c"] * r["num_correct"], "rejected": ["r"] * (len(s) - r["num_correct"])}
           for r, s in zip(rows, rb2_scores)]
    files["rewardbench2"] = write_jsonl(rb2, root / "rewardbench2.jsonl")
    scores["rewardbench2"] = [{"id": r["id"], "scores": s} for r, s in zip(rows, rb2_scores)]
    (root / "ppe").mkdir()
    write_jsonl([{"question_id": "q1", "prompt": "p", "response_1": "a", "response_2": "b", "response_3": "c",
                  "scores": [True, False, False], "sampled_conflict_pairs": [[0, 1], [0, 2]]}], root / "ppe" / "mmlu.jsonl")
    write_jsonl([{"question_id": "q1", "prompt": "p", "response_1": "a", "response_2": "b",
                  "scores": [False, True], "sampled_conflict_pairs": [[1, 0]]}], root / "ppe" / "math.jsonl")
    files["ppe-correctness"] = root / "ppe"
    scores["ppe-correctness"] = [{"set": "mmlu", "question_id": "q1", "scores": [1, 2, 0]},
                                 {"set": "math", "question_id": "q1", "scores": [0, 3]}]
    for name in scores:
        write_jsonl(scores[name], root / f"{name}.given.jsonl")
    return files


def test_command_line_rescoring_from_scores_files(tmp_path):
    files = write_fixtures(tmp_path)
    args = [sys.executable, "tools/eval_rm.py", "--out", str(tmp_path / "out")]
    for name, data in files.items():
        args += ["--benchmark", name, "--data", str(data), "--scores", str(tmp_path / f"{name}.given.jsonl")]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "rewardbench2.summary.json").read_text())
    assert summary["benchmark"] == "rewardbench2" and summary["score"] == pytest.approx(125 / 3)
    assert json.loads((tmp_path / "out" / "ppe-correctness.summary.json").read_text())["score"] == 75
    lines = (tmp_path / "out" / "rewardbench.scores.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"id": 1, "scores": [1, 1]}
    assert "| out | 71.4 | 41.7 | - | - | 75.0 | - | 62.7* |" in (tmp_path / "out" / "results.md").read_text()


def test_missing_field_names_the_file(tmp_path):
    path = write_jsonl([{"pair_id": 1, "question": "q", "response_A": "a", "label": "A>B", "source": "x"}],
                       tmp_path / "judge.jsonl")
    with pytest.raises(ValueError, match=r"judge.jsonl: rows have no 'response_B' field"):
        load_benchmark(BENCHMARKS["judgebench"], str(path))


def test_scores_file_errors_name_the_example(tmp_path):
    files = write_fixtures(tmp_path)
    benchmark = BENCHMARKS["rewardbench"]
    rows = load_benchmark(benchmark, str(files["rewardbench"]))
    write_jsonl([{"id": i, "scores": [0, 1]} for i in range(6)], tmp_path / "short.jsonl")
    with pytest.raises(ValueError, match="no scores for 6"):
        read_scores_file(benchmark, rows, tmp_path / "short.jsonl")
    write_jsonl([{"id": i, "scores": [0, math.nan if i == 3 else 1]} for i in range(7)], tmp_path / "nan.jsonl")
    with pytest.raises(ValueError, match="3 has a score that is not a finite number"):
        read_scores_file(benchmark, rows, tmp_path / "nan.jsonl")


def test_duplicates_and_inconsistent_rows_are_refused(tmp_path):
    row = {"id": 1, "prompt": "p", "chosen": "c", "rejected": "r", "subset": "math-prm"}
    path = write_jsonl([row, row], tmp_path / "dup.jsonl")
    with pytest.raises(ValueError, match="example 1 appears twice"):
        load_benchmark(BENCHMARKS["rewardbench"], str(path))
    rb2 = {"id": "x", "prompt": "p", "chosen": ["a", "b"], "rejected": ["c"], "num_correct": 1, "subset": "Math"}
    with pytest.raises(ValueError, match="num_correct=1 but 2 chosen"):
        BENCHMARKS["rewardbench2"].responses(rb2)


def test_rewardbench2_ties_margin_leaves_out_exact_ties():
    """An id whose two correct answers score exactly alike counts in cp and cp_hard, not in the margin term
    (allenai's rule): only id 1's tanh(2) remains, where including id 3 would add tanh(+inf) = 1."""
    rows, scores = rewardbench2_fixture()
    rows = [*rows, {"id": "ref:3", "subset": "Ties", "num_correct": 1},
            {"id": "tied:3", "subset": "Ties", "num_correct": 2}]
    scores = [*scores[:6], [2, 3], [2, 1, 1.5], [5, 1], [3, 3, 0]]  # id 2 made accurate-free; id 3 exact tie
    ties = scoring.rewardbench2(rows, scores)[1]["ties_details"]
    # id 2: margin -1 (ref), -0.5 (tied), diff 1 -> tanh(-2); id 3: margin 4 / 3, diff 0 -> left out
    assert ties["correctness_margin_score"] == pytest.approx((math.tanh(2) + math.tanh(-2)) / 2)
    assert ties["correctness_preferred"] == pytest.approx(2 / 3)  # ids 1 and 3: margin > diff
    rows, scores = rows[-2:], scores[-2:]  # only the exact tie: no id for the margin term, m = 0
    assert scoring.rewardbench2(rows, scores)[1]["ties_details"]["correctness_margin_score"] == 0.0
