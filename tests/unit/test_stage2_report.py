"""Stage 2's held-out report: the value MSE and the correlation of V(x) with the mean frozen reward, with the
number of held-out prompts they come from; no correlation from too few prompts, and a warning that says why."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.testing import save_tiny_hf_model
from megatron_save.testing.synthetic import synthetic_response_groups, write_jsonl
from megatron_save.trainers.common import BatchSettings, DataSettings
from megatron_save.trainers.optimizer import OptimizerSettings
from megatron_save.trainers.stage2_value import (
    MIN_CORRELATION_PROMPTS,
    Stage2Config,
    too_few_prompts_warning,
    train_stage2,
    value_correlation,
)


def test_no_correlation_from_fewer_prompts_than_the_minimum():
    values, targets = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.4]), torch.tensor([0.0, 1.0, 0.1, 0.8, 0.5])
    assert value_correlation(values, targets) == pytest.approx(
        torch.corrcoef(torch.stack([values, targets]))[0, 1].item())
    for count in range(1, MIN_CORRELATION_PROMPTS):
        # Two prompts always correlate at +-1: exactly what a report must not claim.
        assert value_correlation(values[:count], targets[:count]) is None, count


def test_no_correlation_while_values_or_targets_are_constant():
    varied = torch.linspace(0.0, 1.0, 8)
    assert value_correlation(torch.zeros(8), varied) is None  # a zero-initialised head
    assert value_correlation(varied, torch.full((8,), 0.5)) is None


def test_the_warning_names_the_count_and_the_settings():
    warning = too_few_prompts_warning(2)
    assert "2 held-out prompts" in warning and str(MIN_CORRELATION_PROMPTS) in warning
    assert "data.eval_fraction" in warning and "data.eval_data" in warning
    assert too_few_prompts_warning(MIN_CORRELATION_PROMPTS) is None


def test_stage2_reports_its_held_out_prompts_and_refuses_a_correlation_from_two(tmp_path, caplog):
    hf_dir = save_tiny_hf_model("qwen2", tmp_path / "hf", reward_model=True, seed=3)
    convert_hf_to_megatron(hf_dir, tmp_path / "rm")
    data = write_jsonl(synthetic_response_groups(20, 2, seed=5), tmp_path / "responses.jsonl")
    cfg = Stage2Config(checkpoint=str(tmp_path / "rm"), output_dir=str(tmp_path / "out"),
                       data=DataSettings(train_data=str(data), eval_fraction=0.1, max_length=96),
                       batch=BatchSettings(global_batch_size=8, micro_batch_size=4),
                       optim=OptimizerSettings(value_head_lr=5e-2, decay_style="constant"))
    package_logger = logging.getLogger("megatron_save")  # it does not propagate to caplog's root handler
    package_logger.addHandler(caplog.handler)
    try:
        train_stage2(cfg)
    finally:
        package_logger.removeHandler(caplog.handler)
    for report in json.loads((tmp_path / "out" / "metrics.json").read_text())["eval"]:
        assert report["eval_prompts"] == 2 and report["value_correlation"] is None, report
        assert report["value_mse"] >= 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("only 2 held-out prompts" in w and "data.eval_fraction" in w for w in warnings), warnings
