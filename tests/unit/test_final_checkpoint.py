"""Which steps of stage 3 write a run checkpoint (save_every, exit_after_steps, save_final_checkpoint), and the
end-of-run warning for a run whose reward-model updates were all value-only."""

from __future__ import annotations

from collections import Counter

import pytest

from megatron_save.trainers.stage3 import Stage3Config
from megatron_save.trainers.stage3.loop import saves_run_checkpoint
from megatron_save.trainers.stage3.metrics import value_only_run_warning
from megatron_save.trainers.strategies import strategy_named


def _checkpointed_steps(total_steps: int, start: int = 0, **settings) -> list[int]:
    cfg = Stage3Config(output_dir="o", train_data="d", total_steps=total_steps, **settings)
    last = min(total_steps, start + cfg.exit_after_steps) if cfg.exit_after_steps else total_steps
    return [step for step in range(start + 1, last + 1) if saves_run_checkpoint(cfg, step, last)]


@pytest.mark.parametrize(("settings", "steps"), [
    ({}, [6]),  # today's default: one checkpoint at the end
    ({"save_final_checkpoint": False}, []),  # the final models alone
    ({"save_every": 2}, [2, 4, 6]),
    ({"save_every": 2, "save_final_checkpoint": False}, [2, 4]),
    ({"save_every": 4, "save_final_checkpoint": False}, [4]),
    # A launch that stops before total_steps always leaves a checkpoint for the next one to resume from.
    ({"exit_after_steps": 4, "save_final_checkpoint": False}, [4]),
    ({"exit_after_steps": 10, "save_final_checkpoint": False}, []),  # reaches total_steps
])
def test_steps_with_a_run_checkpoint(settings, steps):
    assert _checkpointed_steps(6, **settings) == steps


def test_a_resumed_launch_ends_with_a_checkpoint_only_when_asked():
    assert _checkpointed_steps(6, start=4, exit_after_steps=2, save_final_checkpoint=False) == []
    assert _checkpointed_steps(6, start=2, exit_after_steps=2, save_final_checkpoint=False) == [4]
    assert _checkpointed_steps(6, start=4, exit_after_steps=2) == [6]


def test_the_final_checkpoint_is_on_by_default():
    assert Stage3Config.save_final_checkpoint is True


def test_warns_when_every_rm_update_was_value_only():
    warning = value_only_run_warning(strategy_named("save"), Counter(rm_updates=7, value_only_rm_updates=7), 8)
    assert "all 7 reward-model updates of the 8 steps" in warning
    assert "backbone" in warning and "never learned" in warning
    for setting in ("reward.initial_margin", "reward.optim.value_head_lr", "reward.optim.lr"):
        assert setting in warning, setting
    # Without the curriculum filter there is no threshold to blame.
    ablation = value_only_run_warning(strategy_named("save_no_curriculum"),
                                      Counter(rm_updates=3, value_only_rm_updates=3), 3)
    assert "reward.optim.value_head_lr" in ablation and "reward.initial_margin" not in ablation


@pytest.mark.parametrize(("strategy", "counters"), [
    ("save", Counter(rm_updates=7, value_only_rm_updates=6)),  # one update trained the backbone
    ("save", Counter()),  # no RM update at all (every step skipped)
    ("mean_reward", Counter(rm_updates=4)),  # no value head: never value-only
    ("frozen", Counter()),  # trains no backbone
])
def test_no_warning_otherwise(strategy, counters):
    assert value_only_run_warning(strategy_named(strategy), counters, 8) is None
