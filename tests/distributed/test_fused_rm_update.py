"""The fused reward-model update (one forward-backward scores, partitions and trains) gives the same pre-update
scores, partition, gradient norm and parameters as the three-pass reference it replaced (score, partition, then
update on the precomputed partition), within 1e-6 relative, at TP1 x DP4, TP2 x DP2, PP2 x DP2 and TP2 x PP2
(4 gloo processes): SAVE with a non-empty and with an empty B~ (value-only), Mean Reward and HL-BT."""

from __future__ import annotations

import pytest
from helpers import LAYOUTS, read_json, torchrun

CASES = ("save", "save_value_only", "mean_reward", "hl_bt")


@pytest.fixture(scope="module")
def fused_and_oracle(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_rm") / "results.json"
    torchrun("fused_rm_worker.py", 4, "--policy", str(tiny_models["llama-lm"]["mg"]), "--reward",
             str(tiny_models["llama-rmv"]["mg"]), "--out", str(out))
    return read_json(out)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_update_matches_the_three_pass_reference(fused_and_oracle, layout, case):
    result = fused_and_oracle[f"{layout}-{case}"]
    fused, oracle = result["fused"], result["oracle"]
    assert fused["pos"] == oracle["pos"] and fused["neg"] == oracle["neg"]
    assert fused["reward_count"] == oracle["reward_count"]
    for name in ("rewards", "values", "rescored", "rescored_values"):
        assert fused[name] == pytest.approx(oracle[name], rel=1e-6, abs=1e-7), name
    assert fused["grad_norm"] == pytest.approx(oracle["grad_norm"], rel=1e-6)
    assert result["param_rel_diff"] < 1e-6
    assert result["value_head_change"] > 0 or case in ("mean_reward", "hl_bt")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_cases_do_what_they_say(fused_and_oracle, layout):
    """Each case exercises its path: B~ non-empty for SAVE and Mean Reward, empty for the value-only update, which
    leaves the backbone where it was; HL-BT has pairs."""
    for case in CASES:
        result = fused_and_oracle[f"{layout}-{case}"]
        assert result["fused"]["stepped"]
        assert (result["fused"]["reward_count"] == 0) == (case == "save_value_only"), case
        assert (result["backbone_change"] == 0) == (case == "save_value_only"), case
        if case == "save_value_only":
            assert not any(result["fused"]["pos"]) and not any(result["fused"]["neg"])
    assert fused_and_oracle[f"{layout}-save"]["fused"]["rescored"] != fused_and_oracle[f"{layout}-save"]["fused"][
        "rewards"]  # the update moved R
