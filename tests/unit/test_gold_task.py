"""The gold-reward task: the gold reward against hand-computed values, prompts, demonstrations, labelled pairs
and the written task data."""

from __future__ import annotations

import json
import random

import pytest

from megatron_save.testbed.data import TaskDataSizes, write_task_data
from megatron_save.testbed.task import (
    CONSONANTS,
    VOWELS,
    GoldTaskSettings,
    demonstration,
    gold_pair,
    gold_reward,
    make_prompt,
    overlong_pair,
    target_length,
)


@pytest.mark.parametrize("response, expected", [
    ("aeiou", 1.0),            # 5 vowels of 5 letters, length right
    ("aei", 3 / 5),            # purity 1, length fit 1 - 2/5
    ("aeb c", 2 / 4 * 4 / 5),  # whitespace ignored: 4 letters, 2 vowels, fit 1 - 1/5
    ("aeiouaeiou", 0.0),       # twice the length: fit max(0, 1 - 5/5)
    ("aeiouaei", 2 / 5),       # 8 letters: fit 1 - 3/5, purity 1
    ("bcdfg", 0.0),            # no vowel
    ("a1e2i", 3 / 5),          # digits are letters that are not vowels
    ("", 0.0),
    ("   ", 0.0),
])
def test_gold_reward_hand_computed(response, expected):
    assert gold_reward("xyz: write 5 vowels", response) == pytest.approx(expected)


def test_gold_reward_is_the_formula_of_the_module_docstring():
    rng = random.Random(0)
    for _ in range(200):
        target = rng.randint(2, 8)
        response = "".join(rng.choice(VOWELS + CONSONANTS + " ") for _ in range(rng.randint(1, 14)))
        letters = response.replace(" ", "")
        if not letters:
            continue
        vowels = sum(response.count(v) for v in VOWELS)
        expected = vowels / len(letters) * max(0.0, 1 - abs(len(letters) - target) / target)
        assert gold_reward(f"abc: write {target} vowels", response) == pytest.approx(expected)


def test_short_responses_score_vowels_over_target_the_proxy_feature():
    # Up to L letters, g = vowels / L: more vowels is always better, whatever the length.
    for response in ("a", "ab", "aab", "eiu", "eixu"):
        assert gold_reward("q: write 6 vowels", response) == pytest.approx(sum(c in VOWELS for c in response) / 6)


def test_target_length_refuses_other_prompts():
    assert target_length("kqz: write 7 vowels") == 7
    with pytest.raises(ValueError, match="not a gold-task prompt"):
        target_length("write seven vowels")


def test_prompts_and_demonstrations_follow_the_settings():
    settings = GoldTaskSettings(min_target=3, max_target=5, demo_noise=0.0, demo_shortfall=1)
    rng = random.Random(1)
    for _ in range(100):
        prompt = make_prompt(rng, settings)
        target = target_length(prompt)
        assert 3 <= target <= 5
        response = demonstration(rng, prompt, settings)
        assert target - 1 <= len(response) <= target and set(response) <= set(VOWELS)  # noise 0: vowels only
    noisy = GoldTaskSettings(demo_noise=1.0)
    assert set(demonstration(rng, "abc: write 8 vowels", noisy)) <= set(CONSONANTS)


def test_gold_pairs_prefer_higher_gold_and_drop_ties():
    pair = gold_pair("abc: write 4 vowels", "ab", "aeio")
    assert (pair["chosen"], pair["rejected"]) == ("aeio", "ab")
    assert pair["gold_chosen"] == 1.0 and pair["gold_rejected"] == pytest.approx(0.25)
    assert gold_pair("abc: write 4 vowels", "ab", "ba") is None


def test_task_data_parts_are_disjoint_and_sized(tmp_path):
    sizes = TaskDataSizes(demonstrations=20, rm_prompts=10, value_prompts=5, rl_prompts=8, eval_prompts=6)
    write_task_data(tmp_path, seed=3, sizes=sizes, settings=GoldTaskSettings())
    seen = set()
    for name, count in (("demonstrations", 20), ("rm_prompts", 10), ("value_prompts", 5), ("rl_prompts", 8),
                        ("eval_prompts", 6)):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        prompts = {row["prompt"] for row in rows}
        assert len(rows) == len(prompts) == count and not prompts & seen
        seen |= prompts
    again = tmp_path / "again"
    write_task_data(again, seed=3, sizes=sizes, settings=GoldTaskSettings())
    assert (again / "eval_prompts.jsonl").read_text() == (tmp_path / "eval_prompts.jsonl").read_text()


def test_overlong_pairs_pad_past_the_target_with_vowels_and_are_gold_labelled():
    rng, settings = random.Random(0), GoldTaskSettings()
    pairs, unpadded_chosen = 0, 0
    for _ in range(2000):
        prompt = make_prompt(rng, settings)
        response, target = demonstration(rng, prompt, settings), target_length(prompt)
        pair = overlong_pair(rng, prompt, response)
        if pair is None:  # a gold tie
            continue
        padded = max(pair["chosen"], pair["rejected"], key=len)
        assert padded.startswith(response) and set(padded[len(response):]) <= set(VOWELS)
        assert target + 2 <= len(padded) <= target + max(2, target)
        assert pair["gold_chosen"] == gold_reward(prompt, pair["chosen"]) > gold_reward(prompt, pair["rejected"])
        pairs, unpadded_chosen = pairs + 1, unpadded_chosen + (pair["chosen"] == response)
    # On demonstration-like responses (near L, 70% vowels) the padding mostly costs gold: the signal the proxy lacks.
    assert pairs > 1800 and 0.85 < unpadded_chosen / pairs < 0.95
    assert overlong_pair(rng, "xyz: write 2 vowels", "") is None  # both gold 0: 4 letters at L = 2 have fit 0
