"""Token-budget micro-batches (data/token_budget.py): hand cases, properties on random lengths, the same count on
every simulated data-parallel rank, and a brute-force check that the partition's largest micro-batch is optimal."""

from __future__ import annotations

import itertools
import random

import pytest

from megatron_save.data.token_budget import (
    agreed_micro_batches,
    micro_batch_tokens,
    min_micro_batches,
    partition_by_tokens,
    rank_partition,
    share_scales,
)

SETTING = "reward.max_tokens_per_micro_batch"


def test_hand_cases():
    # 4 rows of 10 in a 20-token budget: two pairs.
    assert partition_by_tokens([10, 10, 10, 10], 20, 2, SETTING) == [[0, 1], [2, 3]]
    # Long rows alone, short rows together: [9] = 9, [5, 4, 3] = 15 within 16 tokens.
    assert partition_by_tokens([3, 9, 4, 5], 16, 2, SETTING) == [[1], [0, 2, 3]]
    assert min_micro_batches([3, 9, 4, 5], 16, SETTING) == 2
    # A count above the minimum balances: 3 micro-batches of 3 rows under a 12-token budget -> [9], [5], [4, 3].
    assert partition_by_tokens([3, 9, 4, 5], 16, 3, SETTING) == [[1], [3], [0, 2]]
    # More micro-batches than rows: empty ones at the end.
    assert partition_by_tokens([5, 7], 7, 3, SETTING) == [[1], [0], []]
    assert micro_batch_tokens([3, 9, 4]) == 27 and micro_batch_tokens([]) == 0
    assert partition_by_tokens([], 10, 2, SETTING) == [[], []]


def test_a_row_longer_than_the_budget_is_refused_naming_the_setting_and_the_length():
    with pytest.raises(ValueError, match=r"reward.max_tokens_per_micro_batch=8 is smaller than a row of 12 tokens"):
        partition_by_tokens([3, 12, 4], 8, 3, SETTING)
    with pytest.raises(ValueError, match="must be >= 1"):
        min_micro_batches([3], 0, SETTING)
    with pytest.raises(ValueError, match="need at least 2 micro-batches, not 1"):
        partition_by_tokens([10, 10, 10], 20, 1, SETTING)


@pytest.mark.parametrize("seed", range(20))
def test_properties_on_random_lengths(seed):
    rng = random.Random(seed)
    rows = rng.randint(1, 40)
    lengths = [rng.randint(1, 64) for _ in range(rows)]
    budget = rng.randint(64, 400)
    minimum = min_micro_batches(lengths, budget, SETTING)
    for count in range(minimum, minimum + 4):
        parts = partition_by_tokens(lengths, budget, count, SETTING)
        assert len(parts) == count
        assert sorted(i for part in parts for i in part) == list(range(rows))  # every row exactly once
        assert all(micro_batch_tokens([lengths[i] for i in part]) <= budget for part in parts)
        assert all(parts[:min(count, rows)])  # empty micro-batches only when rows run out
    # The minimum is a minimum: the total tokens need at least this many (a lower bound any partition obeys).
    assert minimum >= -(-sum(lengths) // budget)


@pytest.mark.parametrize("seed", range(10))
def test_every_simulated_data_parallel_rank_gets_the_same_count(seed):
    rng = random.Random(100 + seed)
    ranks = rng.choice([2, 3, 4])
    budget = 256
    per_rank = [[rng.randint(8, 128) for _ in range(rng.randint(1, 16))] for _ in range(ranks)]
    count = agreed_micro_batches(per_rank, budget, SETTING)
    assert count == max(min_micro_batches(lengths, budget, SETTING) for lengths in per_rank)
    for lengths in per_rank:
        parts = partition_by_tokens(lengths, budget, count, SETTING)
        assert len(parts) == count
        assert all(micro_batch_tokens([lengths[i] for i in part]) <= budget for part in parts)


def _best_largest(lengths: list[int], count: int) -> int:
    """Brute force: the smallest largest micro-batch over every assignment of rows to ``count`` labelled parts."""
    best = None
    for labels in itertools.product(range(count), repeat=len(lengths)):
        largest = max(micro_batch_tokens([l for l, k in zip(lengths, labels) if k == part]) for part in range(count))
        best = largest if best is None else min(best, largest)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_largest_micro_batch_is_as_small_as_any_partition_makes_it(seed):
    rng = random.Random(200 + seed)
    lengths = [rng.randint(1, 20) for _ in range(rng.randint(2, 6))]
    budget = len(lengths) * max(lengths)
    for count in range(1, min(3, len(lengths)) + 1):
        parts = partition_by_tokens(lengths, budget, count, SETTING)
        largest = max(micro_batch_tokens([lengths[i] for i in part]) for part in parts)
        assert largest == _best_largest(lengths, count)
    assert min_micro_batches(lengths, max(lengths), SETTING) == min(
        c for c in range(1, len(lengths) + 1) if _best_largest(lengths, c) <= max(lengths))


def test_budget_settings_are_checked_naming_the_setting():
    import dataclasses

    from megatron_save.trainers.common import BatchSettings, check_settings
    from megatron_save.trainers.stage3.config import Stage3Config, check_stage3_config

    @dataclasses.dataclass
    class Stage1Like:
        batch: BatchSettings = dataclasses.field(default_factory=lambda: BatchSettings(max_tokens_per_micro_batch=64))

    check_settings(Stage1Like())  # stages 1, 2 and SFT take a budget
    check_settings(Stage1Like(BatchSettings()))  # 0: fixed micro-batches
    with pytest.raises(ValueError, match=r"batch.max_tokens_per_micro_batch=-1: must be >= 0"):
        check_settings(Stage1Like(BatchSettings(max_tokens_per_micro_batch=-1)))
    cfg = Stage3Config()
    cfg.reward.max_tokens_per_micro_batch = 512
    cfg.policy.max_tokens_per_micro_batch = 512
    check_stage3_config(cfg)  # SAVE takes both
    cfg.policy.max_tokens_per_micro_batch = -1
    with pytest.raises(ValueError, match=r"policy.max_tokens_per_micro_batch=-1 must be >= 0"):
        check_stage3_config(cfg)
    cfg.policy.max_tokens_per_micro_batch = 0
    cfg.reward.strategy, cfg.reward.offline_data = "offline_bt", "pairs.jsonl"
    with pytest.raises(ValueError, match=r"reward.max_tokens_per_micro_batch=512 is not supported with "
                                         r"reward.strategy=offline_bt"):
        check_stage3_config(cfg)


def test_share_scales_make_megatrons_mean_the_global_mean():
    # 2 ranks; rank 0's micro-batches hold 3 and 1 examples, rank 1's 2 and 2 (8 in all).
    assert share_scales([3, 1], 8, 2) == [3 / 8 * 2 * 2, 1 / 8 * 2 * 2]
    assert share_scales([0, 0], 0, 2) == [0.0, 0.0]
    # Independent transcription: micro-batch means times scales, averaged over micro-batches then ranks (Megatron,
    # DDP), equal the mean over every example.
    rng = random.Random(0)
    losses = [[[rng.random() for _ in range(n)] for n in sizes] for sizes in ([3, 1], [2, 2])]
    megatron = sum(sum(scale * sum(micro) / len(micro)
                       for scale, micro in zip(share_scales([len(m) for m in rank], 8, 2), rank)) / len(rank)
                   for rank in losses) / 2
    assert megatron == pytest.approx(sum(x for rank in losses for micro in rank for x in micro) / 8, rel=1e-12)


def test_rank_partition_agrees_the_count_over_ranks():
    lengths = [[10, 10, 10, 10], [40, 40, 40, 40]]  # rank 0 alone would need 1 micro-batch of 40 tokens
    assert rank_partition(lengths, 1, 80, SETTING) == [[0, 1], [2, 3]]
    assert len(rank_partition(lengths, 0, 80, SETTING)) == 2


def test_pair_micro_batches_keep_a_pair_together_and_the_mean_over_pairs(monkeypatch):
    from megatron_save.data.preference import PreferencePair
    from megatron_save.trainers import common

    monkeypatch.setattr(common.parallel_state, "get_data_parallel_world_size", lambda: 2)
    monkeypatch.setattr(common.parallel_state, "get_data_parallel_rank", lambda: 0)
    lengths = [(3, 5), (2, 2), (2, 1), (6, 4), (1, 1), (1, 2), (2, 3), (1, 1)]  # (chosen, rejected) tokens
    pairs = [PreferencePair(list(range(1, c + 1)), list(range(1, r + 1))) for c, r in lengths]
    settings = common.BatchSettings(global_batch_size=8, max_tokens_per_micro_batch=12)
    micro_batches = common.pair_micro_batches(pairs, list(range(8)), settings, 0)
    # Rank 0 holds pairs 0-3 (pair tokens 10, 4, 4, 12), rank 1 pairs 4-7 (2, 4, 6, 2): rank 0 needs 3.
    assert [m.input_ids.shape for m in micro_batches] == [(2, 6), (2, 5), (4, 2)]
    assert [m.loss_scale for m in micro_batches] == pytest.approx([1 / 8 * 6, 1 / 8 * 6, 2 / 8 * 6])
    assert micro_batches[2].attention_mask.sum(dim=1).tolist() == [2, 2, 2, 1]  # chosen, rejected of pairs 1, 2
    with pytest.raises(ValueError, match=r"batch.max_tokens_per_micro_batch=11 is smaller than pair 3 \(chosen \+ "
                                         r"rejected at its longer row of 6 tokens: 12\)"):
        common.pair_micro_batches(pairs, list(range(8)), common.BatchSettings(
            global_batch_size=8, max_tokens_per_micro_batch=11), 0)
