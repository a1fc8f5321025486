"""examples/paper/reproduce.sh at the paper's settings, without GPUs: DRY_RUN=1 prints every command it would run,
and each trainer launch's config passes its checks and the layout check for the paper's models on 4 GPUs (as on a
GPU machine with Transformer Engine or Apex). The same script at tiny sizes runs for real in
tests/e2e/test_paper_recipe.py."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import REPO

from megatron_save.checkpoint.model_checkpoint import META_FILE
from megatron_save.config import load_config
from megatron_save.distributed.init import ModelShape, check_parallel_layout
from megatron_save.evaluation.paper_tables import ROWS
from megatron_save.trainers.common import check_settings
from megatron_save.trainers.sample_responses import SampleResponsesConfig, check_sample_config
from megatron_save.trainers.stage1_bt import Stage1Config
from megatron_save.trainers.stage2_value import Stage2Config
from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config

# config.json facts of the paper's models (6.1): layers, heads, key/value heads, vocabulary.
PAPER_SHAPES = {"Qwen2.5-3B-Instruct": ModelShape(36, 16, 2, 151936, "Qwen2.5-3B-Instruct"),
                "Qwen3-4B-Instruct-2507": ModelShape(36, 32, 8, 151936, "Qwen3-4B-Instruct-2507"),
                "rm": ModelShape(28, 24, 8, 128256, "Skywork-Reward-V2-Llama-3.2-3B")}
TRAINERS = {"sample-responses": (SampleResponsesConfig, check_sample_config), "stage2": (Stage2Config, check_settings),
            "stage3": (Stage3Config, check_stage3_config)}


def dry_run(**settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", **settings}
    return subprocess.run(["bash", "examples/paper/reproduce.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def commands_of(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("[reproduce")]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("paper") / "work"


@pytest.fixture(scope="module")
def paper_commands(work) -> list[list[str]]:
    commands = commands_of(dry_run(WORK=str(work)))
    assert not work.exists(), "a dry run wrote to WORK"
    return commands


def stand_in_inputs(args: list[str]) -> None:
    """What the earlier steps would have written for a launch's key=value paths: a model checkpoint's metadata
    file, an (empty) data file; the checks look for them."""
    for key, value in (a.split("=", 1) for a in args if "=" in a):
        if key.endswith("checkpoint"):
            Path(value).mkdir(parents=True, exist_ok=True)
            (Path(value) / META_FILE).write_text("{}")
        elif key.endswith("_data") and value.endswith(".jsonl"):
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            Path(value).touch()


@pytest.fixture
def gpu_machine(monkeypatch):
    """What the checks read of a 4-GPU node under torchrun with the GPU extras (vLLM's CUDA platform included)."""
    cuda_platform = SimpleNamespace(device_name="cuda", is_unspecified=lambda: False, is_cpu=lambda: False,
                                    is_sleep_mode_available=lambda: True)
    monkeypatch.setattr("megatron_save.rollout.vllm_engine.vllm_platform", lambda: cuda_platform)
    monkeypatch.setattr("megatron_save.trainers.stage3.config.distributed_optimizer_state_supported", lambda: True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


def _launches(commands):
    for command in commands:
        if command[:1] == ["torchrun"] and "megatron_save" in command:
            start = command.index("megatron_save") + 1
            yield int(command[command.index("--nproc-per-node") + 1]), command[start], command[start + 1:]


def _model_of(path: str) -> str:
    """The paper model a checkpoint of the run holds: WORK/models/<name>, else an RM the run trained."""
    return path.rsplit("/", 1)[1] if "/models/" in path else "rm"


def test_every_trainer_launch_passes_its_checks(paper_commands, gpu_machine):
    launches = list(_launches(paper_commands))
    assert sorted({command for _, command, _ in launches}) == sorted(TRAINERS)
    for world, command, args in launches:
        schema, check = TRAINERS[command]
        files = [a for a in args if "=" not in a]
        stand_in_inputs(args)
        cfg = load_config(schema, [REPO / f for f in files], [a for a in args if "=" in a])
        check(cfg)
        checkpoints = [cfg.checkpoint] if command != "stage3" else [cfg.policy.checkpoint, cfg.reward.checkpoint]
        for checkpoint in checkpoints:
            check_parallel_layout(cfg.parallel, world, PAPER_SHAPES[_model_of(checkpoint)])


def test_every_row_runs_for_both_policies(paper_commands, work):
    outputs = [a.split("=", 1)[1] for _, command, args in _launches(paper_commands) if command == "stage3"
               for a in args if a.startswith("output_dir=")]
    expected = {f"{work}/{policy}/{row}" for policy in ("Qwen2.5-3B-Instruct", "Qwen3-4B-Instruct-2507")
                for row in ROWS if row != "initial"}
    expected -= {f"{work}/Qwen3-4B-Instruct-2507/offline_bt"}  # policy-independent: run once
    assert sorted(outputs) == sorted(expected)
    evals = [c[c.index("--out") + 1] for c in paper_commands if "tools/eval_rm.py" in c]
    assert len(evals) == 2 + 2 * 5 and all(c.count("--benchmark") == 6 for c in paper_commands if "tools/eval_rm.py" in c)
    answers = [c for c in paper_commands if "tools/export_policy_answers.py" in c]
    assert len(answers) == 2 * 7 and all(c.count("--benchmark") == 2 for c in answers)


def test_rows_are_checked_and_improved_rm_brings_save():
    result = dry_run(ROWS="save hl_btt")
    assert result.returncode == 1 and "unknown row 'hl_btt' in ROWS" in result.stderr
    result = dry_run(ROWS="improved_rm", POLICY_HF="Qwen/Qwen3-4B-Instruct-2507")
    assert result.returncode == 0, result.stderr
    runs = [a for c in commands_of(result) if "stage3" in c for a in c if a.startswith("output_dir=")]
    assert runs == ["output_dir=work/paper/Qwen3-4B-Instruct-2507/save",
                    "output_dir=work/paper/Qwen3-4B-Instruct-2507/improved_rm"]
    assert "reward.checkpoint=work/paper/Qwen3-4B-Instruct-2507/save/reward_model" in result.stdout


def test_a_missing_benchmark_file_is_named(tmp_path):
    result = subprocess.run(["bash", "examples/paper/reproduce.sh"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "ROWS": "initial", "WORK": str(tmp_path / "work"),
                                 "BENCHMARK_DIR": str(tmp_path / "nothing"), "POLICY_HF": "p",
                                 "DRY_RUN": ""}, timeout=600, input="")
    # Without DRY_RUN the script would convert first; the benchmark files are looked up before anything runs.
    assert result.returncode == 1
    assert f"no {tmp_path}/nothing/reward-bench/filtered.parquet, .jsonl, .json or directory" in result.stderr


def test_the_stage1_example_passes_its_checks(tmp_path):
    """examples/paper/stage1_bt.yaml (an RM of one's own; the recipe does not run stage 1) on 4 GPUs."""
    checkpoint = tmp_path / "rm"
    stand_in_inputs([f"checkpoint={checkpoint}"])
    cfg = load_config(Stage1Config, [REPO / "examples/paper/stage1_bt.yaml"],
                      [f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'out'}"])
    check_settings(cfg)
    check_parallel_layout(cfg.parallel, 4, PAPER_SHAPES["rm"])
