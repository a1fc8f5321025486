"""sample-responses end to end on the tiny Llama policy: K responses per prompt in stage 2's format, a relaunch
that resumes after a crash (only the missing prompts, a torn last line dropped), refusals, and one torchrun launch
at DP=2 through ``python -m megatron_save`` with the paper's example config, equal to TP=1 for greedy decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from megatron_save.config import load_config
from megatron_save.data.response_groups import load_response_groups
from megatron_save.testing import tiny_tokenizer
from megatron_save.trainers.sample_responses import (
    RESPONSES_FILE,
    SampleResponsesConfig,
    padded_to_multiple,
    sample_responses,
)

PAPER_CONFIG = REPO / "examples" / "paper" / "sample_responses.yaml"
# "Hi there" twice: a prompt listed twice gets two rows, and a resumed run counts occurrences.
PROMPTS = ["Hi there", "Tell me a story", "What is 2+2?", "Name a color", "Hi there"]
SMALL = ["rollout.sampling.n=3", "rollout.sampling.max_new_tokens=6", "prompts_per_batch=2", "max_prompt_length=128"]
# The paper's config made runnable on CPU: HF generate one sequence at a time (no padding, so every layout
# computes each response alike), greedy.
GREEDY = [*SMALL, "rollout.backend=transformers", "rollout.max_batch_size=1", "rollout.sampling.temperature=0"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def settings(policy: Path, prompts: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [f"checkpoint={policy}", f"prompt_data={prompts}", f"output_dir={output_dir}", *overrides]


def run(policy: Path, prompts: Path, output_dir: Path, *overrides: str, config: Path | None = None) -> Path:
    return sample_responses(load_config(SampleResponsesConfig, config, settings(policy, prompts, output_dir,
                                                                                 *overrides)))


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_k_responses_per_prompt_that_stage_2_loads_and_a_resumed_crash(tiny_models, prompt_file, tmp_path,
                                                                       world_of_one):
    policy = tiny_models["llama-lm"]["mg"]
    path = run(policy, prompt_file, tmp_path / "run", *SMALL)
    assert path == tmp_path / "run" / RESPONSES_FILE
    rows = rows_of(path)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(len(r["responses"]) == 3 and len(r["truncated"]) == 3 for r in rows)
    assert len({tuple(r["responses"]) for r in rows}) > 1  # sampled, not one constant answer
    groups, report = load_response_groups(str(path), tiny_tokenizer(), max_length=256)
    # The random tiny policy sometimes stops (or writes only special tokens) at once: stage 2 counts those.
    assert len(groups) == report.kept == 5
    assert sum(len(g.sequence_ids) for g in groups) + report.skipped["empty response"] == 15

    # A crash while writing the last round ([4] of the rounds [0, 1], [2, 3], [4]): rows 0-3 whole, row 4 torn.
    whole = path.read_text()
    lines = whole.splitlines(keepends=True)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "sample_settings.json").write_text((tmp_path / "run" / "sample_settings.json").read_text())
    (resumed / RESPONSES_FILE).write_text("".join(lines[:4]) + lines[4][:25])
    run(policy, prompt_file, resumed, *SMALL)
    # Only prompt 4 (the second "Hi there") was sampled again, with its round's seed: the file is the same.
    assert (resumed / RESPONSES_FILE).read_text() == whole
    run(policy, prompt_file, resumed, *SMALL)  # nothing left to sample
    assert (resumed / RESPONSES_FILE).read_text() == whole


def test_a_relaunch_with_other_settings_and_impossible_settings_are_refused(tiny_models, prompt_file, tmp_path,
                                                                            world_of_one):
    policy = tiny_models["llama-lm"]["mg"]
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "sample_settings.json").write_text(json.dumps({"checkpoint": str(policy)}))
    with pytest.raises(ValueError, match="other settings .*max_prompt_length, prompt_data, rollout.sampling"):
        run(policy, prompt_file, output_dir, *SMALL)
    with pytest.raises(ValueError, match="rollout.backend=megatron: Megatron-Core samples with top_k or top_p"):
        run(policy, prompt_file, tmp_path / "megatron", *SMALL, "rollout.backend=megatron")
    with pytest.raises(FileNotFoundError, match="checkpoint=.*: not a model checkpoint"):
        run(tmp_path / "nowhere", prompt_file, tmp_path / "other", *SMALL)
    with pytest.raises(ValueError, match="holds a reward_model; sample-responses needs a policy"):
        run(tiny_models["llama-rm"]["mg"], prompt_file, tmp_path / "rm", *SMALL)


def test_padding_repeats_the_last_prompt_to_equal_shares():
    assert padded_to_multiple([4], 2) == [4, 4] and padded_to_multiple([2, 3], 2) == [2, 3]
    assert padded_to_multiple([1, 2, 3], 4) == [1, 2, 3, 3]


def test_data_parallel_launch_equals_one_process_for_greedy_decoding(tiny_models, prompt_file, tmp_path,
                                                                     world_of_one):
    policy = tiny_models["llama-lm"]["mg"]
    one = run(policy, prompt_file, tmp_path / "tp1", *GREEDY, config=PAPER_CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "megatron_save",
           "sample-responses", str(PAPER_CONFIG), *settings(policy, prompt_file, tmp_path / "dp2", *GREEDY)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "world 2 = TP 1 x PP 1 x DP 2" in result.stderr
    # Rounds [0, 1], [2, 3] and [4] padded to [4, 4]: every prompt once, in order, as at TP=1.
    assert rows_of(tmp_path / "dp2" / RESPONSES_FILE) == rows_of(one)
    assert all(len(set(r["responses"])) == 1 for r in rows_of(one))  # greedy: K equal responses
