"""A training run saved after 2 steps at TP=2 and resumed at PP=2 ends exactly where the straight run ends,
with each optimizer group's learning rate restored (value head and backbone differ)."""

from __future__ import annotations

import pytest
from helpers import read_json, torchrun
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

from megatron_save.testing.synthetic import synthetic_preference_rows, write_jsonl


@pytest.fixture(scope="module")
def resume_results(tiny_models, tmp_path_factory) -> dict:
    """One launch runs both optimizer kinds (one process start-up instead of two)."""
    root = tmp_path_factory.mktemp("resume")
    pairs = write_jsonl(synthetic_preference_rows(16, seed=5), root / "pairs.jsonl")
    torchrun("resume_worker.py", 2, "--ckpt", str(tiny_models["llama-rmv"]["mg"]), "--pairs", str(pairs),
             "--save-dir", str(root / "ckpt"), "--out", str(root / "out.json"))
    return read_json(root / "out.json")


@pytest.mark.parametrize("optimizer", ["plain", "distributed"])
def test_resume_restores_weights_optimizer_and_group_lrs(resume_results, optimizer):
    result = resume_results[optimizer]
    if optimizer == "distributed" and not HAVE_APEX_OR_TE:
        # megatron-core 0.16.1 cannot load a torch-AdamW distributed optimizer; we refuse instead of drifting.
        assert "needs Transformer Engine or NVIDIA Apex" in result["refused"]
        return
    assert result["step"] == 2
    assert result["lrs_loaded"] == result["lrs_saved"]
    assert result["lrs_loaded"]["value_head"] != result["lrs_loaded"]["backbone"]
    assert result["resumed"] == pytest.approx(result["straight"], rel=1e-5, abs=1e-6)
    assert result["resumed_rewards"] == pytest.approx(result["straight_rewards"], rel=1e-4, abs=1e-5)
