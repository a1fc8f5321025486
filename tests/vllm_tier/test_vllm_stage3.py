"""Stage 3 with rollout.backend=vllm on real vLLM, as a user launches it: a SAVE run at Megatron TP=2 (2 processes,
gloo) whose greedy rollouts come from vLLM at vLLM TP=2, against the same run with rollout.backend=transformers.
The policy is Qwen2 with tied embeddings, so every weight sync goes through the tied LM head's reprocessing; the
runs must write the same rollouts.jsonl (byte for byte) and the same metrics except times, memory and throughput,
and the vLLM run must end without a traceback (its engine torn down before the process groups)."""

from __future__ import annotations

import json
import math
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


# Loaded by the perturbed run's processes (PYTHONPATH): the behaviour log-prob of the first token of the first
# response of each rollout batch, lowered by 1, so pi_old / pi_rollout there is about e.
PERTURB = '''
def _perturb():
    from megatron_save.rollout import vllm_engine

    generate = vllm_engine.VLLMRolloutEngine.generate

    def perturbed(self, prompt_ids, sampling):
        rollouts = generate(self, prompt_ids, sampling)
        rollouts.logprobs[0][0][0] -= 1.0
        return rollouts

    vllm_engine.VLLMRolloutEngine.generate = perturbed


_perturb()
'''


def test_token_tis_mismatch_is_small_and_moves_with_a_perturbed_logprob(vllm_models, vllm_reward_model, rl_data,
                                                                         tmp_path, monkeypatch):
    """One step with token TIS on vLLM's behaviour log-probs (sampled at T = 1): the logged mismatch between vLLM
    and the Megatron trainer is small and finite; lowering one behaviour log-prob by 1 moves it by that token's
    share and truncates that token's weight."""
    common = (vllm_models["qwen2"]["mg"], vllm_reward_model, rl_data["prompts"], "total_steps=1", "save_every=0",
              "save_final_checkpoint=false", "rollout_log=true", "policy.rollout_correction.is_level=token",
              "reward.strategy=frozen", *VLLM)  # frozen: every valid response trains, the perturbed one too
    plain, perturbed = tmp_path / "plain", tmp_path / "perturbed"
    _stage3(*stage3_overrides(plain, *common))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PERTURB)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    _stage3(*stage3_overrides(perturbed, *common))
    (before,), (after,) = read_metrics(plain), read_metrics(perturbed)
    mismatch = before["rollout_correction/abs_log_ratio"]
    assert 0 < mismatch < 1e-2, mismatch
    assert 0 <= before["rollout_correction/kl_rollout_old_k3"] < 1e-3
    rows = [json.loads(line) for line in (perturbed / "rollouts.jsonl").read_text().splitlines()]
    tokens = sum(len(c["old_logprobs"]) for row in rows for c in row["policy_update"]["rollout_correction"] if c)
    first = rows[0]["policy_update"]["rollout_correction"][0]
    assert math.exp(first["old_logprobs"][0] - first["rollout_logprobs"][0]) > 2.0  # beyond is_threshold
    assert first["is_weights"][0] == pytest.approx(2.0)
    assert after["rollout_correction/abs_log_ratio"] == pytest.approx(mismatch + 1.0 / tokens, abs=2 * mismatch)
    assert after["rollout_correction/truncated_token_fraction"] >= 1.0 / tokens
