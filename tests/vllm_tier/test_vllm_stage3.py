"""Stage 3 with rollout.backend=vllm on real vLLM, as a user launches it: a SAVE run at Megatron TP=2 (2 processes,
gloo) whose greedy rollouts come from vLLM at vLLM TP=2, against the same run with rollout.backend=transformers.
The policy is Qwen2 with tied embeddings, so every weight sync goes through the tied LM head's reprocessing; the
runs must write the same rollouts.jsonl (byte for byte) and the same metrics except times, memory and throughput,
and the vLLM run must end without a traceback (its engine torn down before the process groups)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, STAGE3_CPU_CONFIG, read_metrics, stage3_overrides

pytestmark = pytest.mark.vllm

GREEDY = ("total_steps=2", "save_every=0", "rollout_log=true", "rollout.sampling.temperature=0")
VLLM = ("rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=2", "rollout.vllm.kv_cache_memory_gib=0.125",
        "rollout.vllm.sleep_between_rollouts=false", "rollout.vllm.enforce_eager=true")
UNTIMED = ("time/", "memory/", "throughput/")


def _stage3(*arguments: str) -> str:
    """torchrun --nproc-per-node 2 -m megatron_save stage3 (examples/cpu/stage3_save.yaml, Megatron TP=2) with the
    arguments; its output (stdout and stderr), after checking that it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "megatron_save", "stage3", str(STAGE3_CPU_CONFIG), *arguments]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    return output


def _untimed(record: dict) -> dict:
    return {name: value for name, value in record.items() if not name.startswith(UNTIMED)}


def test_vllm_rollouts_and_metrics_equal_the_transformers_backend(vllm_models, vllm_reward_model, rl_data, tmp_path):
    runs = {backend: tmp_path / backend for backend in ("transformers", "vllm")}
    common = (vllm_models["qwen2"]["mg"], vllm_reward_model, rl_data["prompts"], *GREEDY)
    _stage3(*stage3_overrides(runs["transformers"], *common))
    output = _stage3(*stage3_overrides(runs["vllm"], *common, *VLLM))
    assert "Traceback" not in output, output[-8000:]
    rollouts = {backend: (out / "rollouts.jsonl").read_text() for backend, out in runs.items()}
    assert rollouts["vllm"].count("\n") == 2 * 4  # a record per prompt of each step
    assert rollouts["vllm"] == rollouts["transformers"]
    metrics = {backend: read_metrics(out) for backend, out in runs.items()}
    assert [r["step"] for r in metrics["vllm"]] == [1, 2]
    assert [_untimed(r) for r in metrics["vllm"]] == [_untimed(r) for r in metrics["transformers"]]
