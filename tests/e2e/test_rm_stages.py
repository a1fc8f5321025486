"""Stages 1 and 2 end to end on CPU, as examples/cpu/tiny_rm_stages.sh runs them (its data from
tools/make_synthetic_data.py, stage 1 at TP=2, stage 2 at PP=2)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from helpers import REPO

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.hf import VALUE_HEAD_FILE


@pytest.fixture(scope="module")
def stages_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("stages") / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(["bash", "examples/cpu/tiny_rm_stages.sh", str(work)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return work


def test_stage1_learns_the_synthetic_preference(stages_run):
    metrics = json.loads((stages_run / "stage1" / "metrics.json").read_text())
    (_, before), (_, after) = metrics["eval_accuracy"][0], metrics["eval_accuracy"][-1]
    assert after >= 0.85 and after > before + 0.2, metrics["eval_accuracy"]
    assert all(torch.isfinite(torch.tensor(step["loss"])) for step in metrics["train"])


def test_stage2_fits_the_value_head_and_freezes_the_rest(stages_run, world_of_one):
    metrics = json.loads((stages_run / "stage2" / "metrics.json").read_text())
    before, after = metrics["eval"][0], metrics["eval"][-1]
    assert after["value_mse"] < 0.5 * before["value_mse"], metrics["eval"]
    assert after["value_correlation"] > 0.5

    stage1, _, _ = build_model_from_checkpoint(stages_run / "stage1")
    stage2, meta, _ = build_model_from_checkpoint(stages_run / "stage2")
    assert meta.value_head
    fitted = dict(stage2.named_parameters())
    for name, param in stage1.named_parameters():
        assert torch.equal(param, fitted[name]), f"stage 2 changed {name}"
    assert fitted["output_layer.value_head.weight"].abs().sum() > 0
    assert (stages_run / "hf_stage2" / VALUE_HEAD_FILE).exists()
