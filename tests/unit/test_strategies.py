"""The strategy table: every row is consistent, the rest of stage 3 asks it, and an unknown name is refused."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config
from megatron_save.trainers.strategies import STRATEGIES, RMStrategy, register_strategy, strategy_named


def test_the_paper_strategies_are_rows():
    assert list(STRATEGIES) == ["save", "save_no_curriculum", "frozen", "offline_bt", "mean_reward", "hl_bt", "r2m"]
    save = STRATEGIES["save"]
    assert (save.anchor, save.curriculum, save.value_head, save.update) == ("value_head", True, True, "before_policy")
    assert not STRATEGIES["save_no_curriculum"].curriculum
    assert STRATEGIES["mean_reward"].anchor == "group_mean" and not STRATEGIES["mean_reward"].value_head
    assert STRATEGIES["r2m"].update == "after_policy" and not STRATEGIES["r2m"].trains_backbone
    assert STRATEGIES["frozen"].update == "never"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_row_is_consistent(name):
    row = STRATEGIES[name]
    assert row.value_head == (row.anchor == "value_head")  # only the value head anchors on V(x)
    assert (row.update == "never") == (row.learns_from == "nothing")
    assert row.trains_backbone == (row.loss is not None)
    assert (row.update == "after_policy") == (row.rewards == "r2m_head")
    if row.curriculum:
        assert row.anchor != "none"  # the filter measures the distance to an anchor
    if row.learns_from == "rollouts":
        assert row.reward_prompts is not None and row.update == "before_policy"


def test_an_unknown_name_is_refused_with_the_list():
    with pytest.raises(ValueError, match=r"reward.strategy='prime' is not one of save, save_no_curriculum, frozen"):
        strategy_named("prime")
    with pytest.raises(ValueError, match=r"reward.strategy='save_v2' is not one of"):  # no prefix matching
        check_stage3_config(Stage3Config(output_dir="o", train_data="d", reward=dataclasses.replace(
            Stage3Config().reward, strategy="save_v2")))


def test_registration_refuses_a_taken_name_and_incomplete_rows():
    with pytest.raises(ValueError, match="already registered"):
        register_strategy(STRATEGIES["save"])
    with pytest.raises(ValueError, match="has no loss"):
        register_strategy(dataclasses.replace(STRATEGIES["frozen"], name="broken", trains_backbone=True))
    with pytest.raises(ValueError, match="names no reward_prompts"):
        register_strategy(dataclasses.replace(STRATEGIES["save"], name="broken", reward_prompts=None))
    assert "broken" not in STRATEGIES


def test_settings_follow_the_row(monkeypatch):
    """update_skips_truncated and offline_data are checked by what a row learns from, not by its name."""
    row = register_strategy(dataclasses.replace(STRATEGIES["offline_bt"], name="offline_bt_copy"))
    try:
        cfg = Stage3Config(output_dir="o", train_data="d")
        cfg.reward.strategy = row.name
        with pytest.raises(ValueError, match="reward.strategy=offline_bt_copy needs reward.offline_data"):
            check_stage3_config(cfg)
        cfg.reward.offline_data, cfg.reward.update_skips_truncated = "pairs.jsonl", True
        with pytest.raises(ValueError, match="update_skips_truncated=true does nothing"):
            check_stage3_config(cfg)
    finally:
        del STRATEGIES[row.name]


def test_rows_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        STRATEGIES["save"].curriculum = False  # type: ignore[misc]
    assert isinstance(STRATEGIES["save"], RMStrategy)
