"""Stage 3 in this process as a world of one: save_final_checkpoint=false leaves the final models and no run
checkpoint, and a run whose reward-model updates were all value-only ends with a warning saying so."""

from __future__ import annotations

import logging

import pytest
from helpers import REPO, read_metrics

from megatron_save.checkpoint.model_checkpoint import META_FILE
from megatron_save.checkpoint.run_checkpoint import CHECKPOINTS_SUBDIR, checkpoint_name, latest_checkpoint
from megatron_save.config import load_config
from megatron_save.trainers.stage3 import Stage3Config, loop


def _config(tiny_models, rl_data, out, *overrides: str) -> Stage3Config:
    return load_config(Stage3Config, REPO / "examples" / "cpu" / "stage3_save.yaml", [
        f"output_dir={out}", f"train_data={rl_data['prompts']}", f"policy.checkpoint={tiny_models['llama-lm']['mg']}",
        f"reward.checkpoint={tiny_models['llama-rmv']['mg']}", "parallel.tensor_model_parallel_size=1",
        "save_every=0", "tensorboard=false", *overrides])


@pytest.fixture
def package_warnings(caplog):
    """The package's log records (its logger does not propagate to caplog's root handler)."""
    package_logger = logging.getLogger("megatron_save")
    package_logger.addHandler(caplog.handler)
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    package_logger.removeHandler(caplog.handler)


def test_no_final_run_checkpoint_when_switched_off(tiny_models, rl_data, tmp_path, world_of_one, package_warnings):
    out = loop.train_stage3(_config(tiny_models, rl_data, tmp_path / "run", "total_steps=2",
                                    "save_final_checkpoint=false"))
    assert latest_checkpoint(out) is None and not list((out / CHECKPOINTS_SUBDIR).glob("step_*"))
    for model in ("policy", "reward_model"):  # the final models are still published
        assert (out / model / META_FILE).is_file(), model
    last = read_metrics(out)[-1]
    assert last["step"] == 2 and last["counters/rm_updates"] == 2
    assert not any("value-only" in w for w in package_warnings())


def test_a_run_of_value_only_updates_ends_with_a_warning(tiny_models, rl_data, tmp_path, world_of_one,
                                                         package_warnings):
    # m0 = 1 with a long horizon: mu(t) stays about 1, so the filter keeps nothing and B~ is always empty. The
    # launch stops after 2 steps (exit_after_steps): it still leaves a checkpoint, and the warning covers it.
    out = loop.train_stage3(_config(tiny_models, rl_data, tmp_path / "run", "total_steps=1000",
                                    "exit_after_steps=2", "reward.initial_margin=1.0",
                                    "save_final_checkpoint=false"))
    last = read_metrics(out)[-1]
    assert last["counters/value_only_rm_updates"] == last["counters/rm_updates"] == 2
    assert latest_checkpoint(out) == out / CHECKPOINTS_SUBDIR / checkpoint_name(2)
    warnings = [w for w in package_warnings() if "value-only" in w]
    assert len(warnings) == 1, package_warnings()
    assert "all 2 reward-model updates" in warnings[0] and "never learned" in warnings[0]
    assert "reward.initial_margin" in warnings[0] and "reward.optim.value_head_lr" in warnings[0]
