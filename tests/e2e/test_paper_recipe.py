"""examples/paper/reproduce.sh end to end, as a user runs it, at tiny sizes: tiny random HF models, tiny data in the
released formats (megatron_save/testing/paper_fixtures.py), one process, two RL steps per row. Every stage runs,
every row of Tables 1 and 3 comes out trained, table1.md holds every row and column, and a relaunch skips it all."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO
from safetensors.torch import load_file

from megatron_save.evaluation.benchmarks import BENCHMARKS, PAPER_ORDER
from megatron_save.evaluation.paper_tables import ROWS, TABLE1_PER_POLICY, TABLE1_SHARED, TABLE3_ROWS
from megatron_save.testing import save_tiny_hf_model
from megatron_save.testing.paper_fixtures import write_paper_recipe_data

POLICY = "tiny-policy"
K = 2
# CPU sizes; plain sampling and these learning rates make two steps move a tiny random model visibly (with Table 8's
# sampling its rewards barely differ within a group, and no group straddles V); the random policy rarely stops
# within 8 tokens, so truncated responses stay in the RM update (the paper's F.1 filter would leave none).
EXTRA_ARGS = ("prompts_per_step=4 rollout.sampling.n=4 rollout.sampling.temperature=1.0 rollout.sampling.top_p=1.0 "
              "rollout.sampling.top_k=0 reward.offline_batch_size=4 reward.update_skips_truncated=false "
              "policy.optim.lr=1e-3 reward.optim.lr=1e-3 reward.optim.value_head_lr=1e-2 reward.prime.optim.lr=1e-3 "
              "policy.optim.use_distributed_optimizer=false reward.optim.use_distributed_optimizer=false "
              "reward.prime.optim.use_distributed_optimizer=false")
RM_ROWS = [*TABLE1_SHARED, *TABLE1_PER_POLICY]


@dataclass
class RecipeRun:
    work: Path
    env: dict
    log: str
    policy_hf: Path
    long_instructions: tuple[str, ...]


def _reproduce(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "examples/paper/reproduce.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3600)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    data = write_paper_recipe_data(root / "data", long_response_chars=60)
    policy = save_tiny_hf_model("llama", root / "hf" / POLICY, seed=1)
    rm = save_tiny_hf_model("llama", root / "hf" / "tiny-rm", reward_model=True, seed=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "GPUS": "1", "TP": "1", "PP": "1", "WORK": str(root / "work"), "POLICY_HF": str(policy), "RM_HF": str(rm),
           "PROMPT_DATA": str(data.prompt_data), "PREFERENCE_DATA": str(data.preference_data),
           "MIN_RESPONSE_TOKENS": "60", "BENCHMARK_DIR": str(data.benchmark_dir), "STEPS": "2", "K": str(K),
           "MAX_NEW_TOKENS": "8", "MAX_LENGTH": "128", "DTYPE": "fp32",
           "SAMPLE_ARGS": "rollout.backend=transformers prompts_per_batch=4",
           "STAGE2_ARGS": "batch.global_batch_size=4 batch.micro_batch_size=2 batch.epochs=8 score_micro_batch_size=4 "
                          "data.eval_fraction=0.25 optim.value_head_lr=5e-2",
           "EXTRA_ARGS": EXTRA_ARGS, "EVAL_ARGS": "--batch-size 8", "ANSWER_ARGS": "--batch-size 4"}
    result = _reproduce(env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return RecipeRun(root / "work", env, result.stdout, policy, data.long_instructions)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected_steps() -> set[str]:
    stage3 = [row for row in ROWS if row != "initial"]
    answers = list(TABLE3_ROWS)
    return {f"convert_{POLICY}", "convert_rm", "select_prompts", "offline_pairs", f"sample_{POLICY}",
            f"stage2_{POLICY}", *(f"stage3_{POLICY}_{row}" for row in stage3),
            "eval_initial", "eval_offline_bt", *(f"eval_{POLICY}_{row}" for row in TABLE1_PER_POLICY),
            *(f"answers_{POLICY}_{row}" for row in answers)}


def test_every_step_ran_once(recipe):
    expected = _expected_steps()
    assert {p.name for p in (recipe.work / ".done").iterdir()} == expected
    ran = re.findall(r"^\[reproduce [\d:]+\] (\S+)$", recipe.log, flags=re.MULTILINE)
    assert sorted(ran) == sorted(expected)


def test_data_preparation_follows_f1(recipe):
    prompts = [row["prompt"] for row in _rows(recipe.work / "data" / "prompts.jsonl")]
    assert prompts == list(recipe.long_instructions)  # the long ones, each once, in order; no empty one
    pairs = _rows(recipe.work / "data" / "offline_pairs.jsonl")
    assert [pair["prompt"] for pair in pairs] == prompts
    responses = _rows(recipe.work / POLICY / "responses" / "responses.jsonl")
    assert sorted(row["prompt"] for row in responses) == sorted(prompts)
    assert all(len(row["responses"]) == K for row in responses)
    assert json.loads((recipe.work / POLICY / "rm_value_anchored" / "metrics.json").read_text())["eval"]


def _scores(eval_dir: Path) -> list:
    return [row["scores"] for row in _rows(eval_dir / "rewardbench.scores.jsonl")]


@pytest.mark.parametrize("row", [row for row in RM_ROWS if row != "initial"])
def test_every_table1_row_trained_its_reward_model(recipe, row):
    eval_dir = recipe.work / "eval" / (row if row in TABLE1_SHARED else f"{POLICY}/{row}")
    metrics = _rows(recipe.work / POLICY / row / "metrics.jsonl")
    assert all(step["rm/grad_norm"] > 0 for step in metrics), metrics  # an RM optimizer step on every RL step
    assert _scores(eval_dir) != _scores(recipe.work / "eval" / "initial"), f"{row}: the RM's scores did not move"


@pytest.mark.parametrize("row", [row for row in TABLE3_ROWS if row != "initial"])
def test_every_table3_row_trained_its_policy(recipe, row):
    initial = load_file(recipe.policy_hf / "model.safetensors")
    trained = {}
    for shard in (recipe.work / "hf" / POLICY / row).glob("*.safetensors"):
        trained.update(load_file(shard))
    assert trained.keys() == initial.keys()
    assert any(not trained[name].equal(initial[name]) for name in initial), f"{row}: the policy did not move"


def test_table1_has_every_row_and_column(recipe):
    lines = (recipe.work / "tables" / "table1.md").read_text().splitlines()
    assert lines[0] == "| Method | " + " | ".join(BENCHMARKS[n].title for n in PAPER_ORDER) + " | Average |"
    rows = {re.search(r"\(`(\w+)`\)", line).group(1): line for line in lines[2:] if "(`" in line}
    assert sorted(rows) == sorted(RM_ROWS)
    for line in rows.values():
        cells = [cell.strip() for cell in line.strip("|").split("|")][1:]
        assert len(cells) == len(PAPER_ORDER) + 1 and all(re.fullmatch(r"\d+\.\d", cell) for cell in cells), line
    assert "*Policy Model: tiny-policy*" in lines[4]


def test_answers_for_every_table3_row(recipe):
    alpaca = json.loads((Path(recipe.env["BENCHMARK_DIR"]) / "alpaca_eval" / "alpaca_eval.json").read_text())
    for row in TABLE3_ROWS:
        answers = recipe.work / "answers" / row / POLICY
        outputs = json.loads((answers / "model_outputs.json").read_text())
        assert [o["instruction"] for o in outputs] == [a["instruction"] for a in alpaca]
        assert {o["generator"] for o in outputs} == {f"{POLICY}-{row}"}
        arena = _rows(answers / "model_answer" / f"{POLICY}-{row}.jsonl")
        assert [a["uid"] for a in arena] == ["u0", "u1", "u2"]
    table3 = (recipe.work / "tables" / "table3.md").read_text()
    assert all(f"(`{row}`) | answers/{row}/{POLICY}/model_outputs.json (3)" in table3 for row in TABLE3_ROWS)


def test_a_relaunch_skips_every_finished_step(recipe):
    """Last in this module: it reruns the script over the finished WORK (only the tables are rebuilt)."""
    table = (recipe.work / "tables" / "table1.md").read_text()
    result = _reproduce(recipe.env)
    assert result.returncode == 0, result.stderr[-4000:]
    skipped = re.findall(r"^\[reproduce [\d:]+\] (\S+): done, skipped$", result.stdout, flags=re.MULTILINE)
    assert sorted(skipped) == sorted(_expected_steps())
    assert (recipe.work / "tables" / "table1.md").read_text() == table
