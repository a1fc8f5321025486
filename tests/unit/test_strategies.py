"""The strategy table: every row is consistent, the rest of stage 3 asks it, and an unknown name is refused."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config
from megatron_save.trainers.strategies import STRATEGIES, RMStrategy, register_strategy, strategy_named


def test_the_paper_strategies_are_rows():
    assert list(STRATEGIES) == ["save", "save_no_curriculum", "frozen", "offline_bt", "mean_reward", "hl_bt", "prime",
                                "r2m", "verifier_hl_bt", "verifier_reward"]  # the last two are no paper's: the
    # testbed's positive control and its oracle
    assert STRATEGIES["verifier_reward"].rewards == "verifier" and STRATEGIES["verifier_reward"].update == "never"
    assert STRATEGIES["verifier_hl_bt"].verifier_grades and not STRATEGIES["hl_bt"].verifier_grades
    save = STRATEGIES["save"]
    assert (save.anchor, save.curriculum, save.value_head, save.update) == ("value_head", True, True, "before_policy")
    assert not STRATEGIES["save_no_curriculum"].curriculum
    assert STRATEGIES["mean_reward"].anchor == "group_mean" and not STRATEGIES["mean_reward"].value_head
    assert STRATEGIES["r2m"].update == "after_policy" and not STRATEGIES["r2m"].trains_backbone
    assert STRATEGIES["frozen"].update == "never"
    prime = STRATEGIES["prime"]
    assert prime.implicit_prm and not prime.trains_backbone and prime.update == "before_policy"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_row_is_consistent(name):
    row = STRATEGIES[name]
    assert row.value_head == (row.anchor == "value_head")  # only the value head anchors on V(x)
    assert (row.update == "never") == (row.learns_from == "nothing")
    assert (row.trains_backbone or row.implicit_prm) == (row.loss is not None)
    assert (row.update == "after_policy") == (row.rewards == "r2m_head")
    if row.curriculum:
        assert row.anchor != "none"  # the filter measures the distance to an anchor
    if row.learns_from == "rollouts":
        assert row.update == "before_policy"
    assert row.scores_in_update == (row.learns_from == "rollouts" and not row.implicit_prm)


def test_an_unknown_name_is_refused_with_the_list():
    with pytest.raises(ValueError, match=r"reward.strategy='ppo_rm' is not one of save, save_no_curriculum, frozen"):
        strategy_named("ppo_rm")
    with pytest.raises(ValueError, match=r"reward.strategy='save_v2' is not one of"):  # no prefix matching
        check_stage3_config(Stage3Config(output_dir="o", train_data="d", reward=dataclasses.replace(
            Stage3Config().reward, strategy="save_v2")))


def test_registration_refuses_a_taken_name_and_incomplete_rows():
    with pytest.raises(ValueError, match="already registered"):
        register_strategy(STRATEGIES["save"])
    with pytest.raises(ValueError, match="has no loss"):
        register_strategy(dataclasses.replace(STRATEGIES["frozen"], name="broken", trains_backbone=True))
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


def _prime_config(**prime) -> Stage3Config:
    cfg = Stage3Config(output_dir="o", train_data="d")
    cfg.reward.strategy, cfg.policy.advantage = "prime", "rloo"
    for name, value in prime.items():
        setattr(cfg.reward if name == "verifier" else cfg.reward.prime, name, value)
    return cfg


def test_prime_settings_are_checked_before_any_model():
    check_stage3_config(_prime_config())
    check_stage3_config(_prime_config(labels="verifier", verifier="megatron_save.testbed.task:gold_reward"))
    cfg = _prime_config()
    cfg.policy.advantage = "grpo"
    with pytest.raises(ValueError, match="reward.strategy=prime computes PRIME's advantages.*policy.advantage=rloo"):
        check_stage3_config(cfg)
    refusals = {"reward.prime.labels='median'": dict(labels="median"),
                "reward.verifier .* is needed with .* reward.prime.labels=verifier": dict(labels="verifier"),
                "and only then": dict(verifier="a:b"),
                "expected module:function": dict(labels="verifier", verifier="gold_reward"),
                "accuracy_low=0.9 and accuracy_high=0.8": dict(accuracy_low=0.9),
                "reward.prime.beta=0.0 must be > 0": dict(beta=0.0)}
    for message, prime in refusals.items():
        with pytest.raises(ValueError, match=message):
            check_stage3_config(_prime_config(**prime))


def test_verifier_is_loaded_by_name_or_refused():
    from megatron_save.testbed.task import gold_reward
    from megatron_save.trainers.stage3.verifier import load_verifier

    assert load_verifier("megatron_save.testbed.task:gold_reward") is gold_reward
    with pytest.raises(ValueError, match="reward.verifier='megatron_save.testbed.task:nope': cannot load"):
        load_verifier("megatron_save.testbed.task:nope")
    with pytest.raises(ValueError, match="cannot load"):
        load_verifier("no_such_module_here:f")


def test_verifier_grades_each_valid_response_and_refuses_out_of_range_grades():
    import torch

    from megatron_save.trainers.stage3.groups import RolloutGroups
    from megatron_save.trainers.stage3.verifier import verifier_grades

    class Letters:  # a tokenizer stand-in: token i is the letter chr(97 + i)
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)

    valid = torch.tensor([[True, True, False]])
    groups = RolloutGroups(prompts=[[{"role": "system", "content": "s"}, {"role": "user", "content": "say a"}]],
                           policy_prompt_ids=[[0]], policy_response_ids=[[[0], [1, 0], [0]]], rm_prompt_lengths=[1],
                           rm_sequences=[[[0], [0], [0]]], valid=valid, truncated=torch.zeros_like(valid),
                           response_lengths=torch.tensor([[1, 2, 1]]))
    seen = []

    def grade(prompt, response):
        seen.append((prompt, response))
        return float(response == "a")

    assert verifier_grades(grade, groups, Letters()).tolist() == [[1.0, 0.0, 0.0]]
    assert seen == [("say a", "a"), ("say a", "ba")]  # the last user turn; the invalid slot is not graded
    with pytest.raises(ValueError, match=r"reward.verifier gave 2.0 for prompt 'say a'; grades must be in \[0, 1\]"):
        verifier_grades(lambda prompt, response: 2.0, groups, Letters())
