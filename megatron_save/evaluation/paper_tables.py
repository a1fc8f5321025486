"""The paper's Tables 1 and 3 from a run of examples/paper/reproduce.sh: which rows they hold, in the paper's order
and words, and where each row's results lie under the run's WORK directory.

    WORK/eval/initial, WORK/eval/offline_bt, WORK/eval/<policy>/<row>    tools/eval_rm.py outputs (Table 1)
    WORK/answers/<row>/<policy>/model_outputs.json                       AlpacaEval 2 answers (Table 3)
    WORK/answers/<row>/<policy>/model_answer/<policy>-<row>.jsonl        Arena-Hard-v2.0 answers (Table 3)
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_save.evaluation.benchmarks import PAPER_ORDER
from megatron_save.evaluation.runner import PARTIAL_NOTE, read_summaries, results_header, results_row

TABLE1_SHARED = {"initial": None, "offline_bt": "Continual Offline Training RM"}
"""Table 1's rows above the policy sections (their RM does not depend on a policy); None: the RM's own name."""
TABLE1_PER_POLICY = {"hl_bt": "HL-BT", "mean_reward": "Mean Reward", "save": "SAVE",
                     "save_no_curriculum": "w/o Curriculum Mechanism",
                     "save_frozen_policy": "w/o Policy Model Optimization"}
"""Table 1's rows of each policy section, in the paper's order."""
TABLE3_ROWS = {"initial": "SFT (the instruct policy before RL)", "reinforce_pp": "REINFORCE++", "prime": "PRIME",
               "grpo": "GRPO", "r2m": "+ R2M", "save": "+ SAVE", "improved_rm": "+ Improved RM"}
"""Table 3's rows of each policy section, in the paper's order."""
ROWS = tuple(dict.fromkeys([*TABLE1_SHARED, *TABLE1_PER_POLICY, *TABLE3_ROWS]))
"""Every row name reproduce.sh takes in ROWS."""


def _summaries(eval_dir: Path) -> dict[str, float]:
    results = read_summaries(eval_dir)
    if not results:
        raise FileNotFoundError(f"{eval_dir}: no <benchmark>.summary.json (tools/eval_rm.py has not run there)")
    return results


def _label(title: str, row: str) -> str:
    return f"{title} (`{row}`)"


def table1_markdown(work: str | Path, rm_name: str, policies: list[str], rows: list[str]) -> str:
    """Table 1 (six RM benchmarks and their average) for the ``rows`` that were run: the shared rows, then a
    section per policy. FileNotFoundError names a wanted row's missing evaluation."""
    work = Path(work)
    lines = results_header()
    partial = False

    def add(title: str, row: str, eval_dir: Path) -> None:
        nonlocal partial
        results = _summaries(eval_dir)
        partial |= len(results) < len(PAPER_ORDER)
        lines.append(results_row(_label(title, row), results))

    for row, title in TABLE1_SHARED.items():
        if row in rows:
            add(title or rm_name, row, work / "eval" / row)
    for policy in policies:
        wanted = [row for row in TABLE1_PER_POLICY if row in rows]
        if wanted:
            lines.append(f"| *Policy Model: {policy}* |" + " |" * (len(PAPER_ORDER) + 1))
        for row in wanted:
            add(TABLE1_PER_POLICY[row], row, work / "eval" / policy / row)
    if partial:
        lines += ["", PARTIAL_NOTE]
    return "\n".join(lines) + "\n"


def answer_files(work: str | Path, row: str, policy: str) -> tuple[Path, Path]:
    """The AlpacaEval 2 and Arena-Hard-v2.0 answer files of one Table 3 row and policy."""
    answers = Path(work) / "answers" / row / policy
    return answers / "model_outputs.json", answers / "model_answer" / f"{policy}-{row}.jsonl"


def _count_answers(path: Path) -> int:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no answers (tools/export_policy_answers.py has not run for it)")
    if path.suffix == ".json":
        return len(json.loads(path.read_text()))
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def table3_markdown(work: str | Path, policies: list[str], rows: list[str]) -> str:
    """Table 3's rows that were run, per policy, with their answer files and counts; the win rates come from
    AlpacaEval 2's and Arena-Hard-v2.0's GPT judges, run elsewhere on these files."""
    work = Path(work)
    lines = ["| Method | AlpacaEval 2 answers | Arena-Hard-v2.0 answers |", "|---|---|---|"]
    for policy in policies:
        wanted = [row for row in TABLE3_ROWS if row in rows]
        if wanted:
            lines.append(f"| *Policy Model: {policy}* | | |")
        for row in wanted:
            cells = [f"{path.relative_to(work)} ({_count_answers(path)})" for path in answer_files(work, row, policy)]
            lines.append(f"| {_label(TABLE3_ROWS[row], row)} | " + " | ".join(cells) + " |")
    lines += ["", "LC / WR (AlpacaEval 2, judge and reference as in the paper's 6.1) and the Arena-Hard-v2.0 win "
              "rate come from those benchmarks' own tools run on these files."]
    return "\n".join(lines) + "\n"
