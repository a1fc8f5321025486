"""Policy answers written in AlpacaEval 2 and Arena-Hard-v2.0 input formats by the command-line tool."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO
from transformers import AutoTokenizer

from megatron_save.evaluation.policy_export import read_prompts
from megatron_save.testing import save_tiny_hf_model
from megatron_save.testing.synthetic import write_jsonl


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny policy whose tokenizer has no padding token, as Llama 3's."""
    model_dir = save_tiny_hf_model("qwen2", tmp_path_factory.mktemp("policy") / "hf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    return model_dir


def _export(policy, benchmark, prompts, out):
    cmd = [sys.executable, "tools/export_policy_answers.py", "--benchmark", benchmark, "--prompts", str(prompts),
           "--hf-model", str(policy), "--model-name", "tiny", "--out", str(out), "--max-new-tokens", "6",
           "--batch-size", "2"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def test_alpaca_eval_format(policy, tmp_path):
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps([{"instruction": f"say {w}", "dataset": "helpful_base"} for w in "abc"]))
    _export(policy, "alpaca_eval", prompts, tmp_path / "model_outputs.json")
    records = json.loads((tmp_path / "model_outputs.json").read_text())
    assert [r["instruction"] for r in records] == ["say a", "say b", "say c"]
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} and r["generator"] == "tiny"
               and isinstance(r["output"], str) for r in records)


def test_arena_hard_format(policy, tmp_path):
    prompts = write_jsonl([{"uid": f"u{i}", "category": "hard_prompt", "subcategory": "x", "prompt": f"q {i}"}
                           for i in range(3)], tmp_path / "question.jsonl")
    _export(policy, "arena_hard", prompts, tmp_path / "tiny.jsonl")
    records = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in records] == ["u0", "u1", "u2"]
    for record in records:
        assert record["model"] == "tiny" and record["messages"][0] == {"role": "user", "content": f"q {record['uid'][1:]}"}
        assert set(record["messages"][1]["content"]) == {"answer"}
        assert set(record) == {"uid", "ans_id", "model", "messages", "tstamp"}


def test_prompt_file_without_the_field_is_refused(tmp_path):
    path = write_jsonl([{"uid": "u0", "question": "q"}], tmp_path / "question.jsonl")
    with pytest.raises(ValueError, match="question.jsonl: rows have no 'prompt' field"):
        read_prompts(str(path), "arena_hard")
