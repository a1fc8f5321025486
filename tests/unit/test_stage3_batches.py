"""Stage 3's pure batch building without a model: row layout over data-parallel ranks, padding, loss masks, and the
loss scales that make Megatron's average over micro-batches and ranks the whole batch's mean."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_save.trainers.stage3.batches import (
    PolicyRows,
    mini_batch_layout,
    policy_loss_scales,
    policy_token_rows,
    prompts_per_rank,
    response_group_batches,
)
from megatron_save.trainers.stage3.groups import RolloutGroups


def _rows(shapes=((3, 4), (5, 2), (2, 6), (4, 1), (3, 3))) -> PolicyRows:
    generator = torch.Generator().manual_seed(0)
    sequences, prompt_lengths, advantages = [], [], []
    for prompt, response in shapes:
        sequences.append(torch.randint(3, 100, (prompt + response,), generator=generator).tolist())
        prompt_lengths.append(prompt)
        advantages.append(torch.randn(response, generator=generator))
    return PolicyRows(sequences, prompt_lengths, advantages)


def test_policy_token_rows_mask_exactly_the_response_tokens():
    rows = _rows()
    layout = mini_batch_layout(len(rows.sequences), parts=1, ranks=2, micro_batch_size=2)  # 5 rows + 3 fillers
    for rank in range(2):
        input_ids, attention_mask, loss_mask, advantages = policy_token_rows(rows, layout, rank, pad_id=0)
        assert input_ids.shape == (4, 8) and loss_mask.shape == advantages.shape == (4, 7)
        for row, i in enumerate(layout[0][rank]):
            if i < 0:  # a filler: its mini-batch's first row, without a loss token
                assert torch.equal(input_ids[row, : len(rows.sequences[0])], torch.tensor(rows.sequences[0]))
                assert not loss_mask[row].any() and not advantages[row].any()
                continue
            prompt, response = rows.prompt_lengths[i], rows.response_lengths[i]
            assert attention_mask[row].sum() == prompt + response
            # Shifted frame: position t scores token t + 1, so the first response token is scored at prompt - 1.
            assert loss_mask[row].nonzero().flatten().tolist() == list(range(prompt - 1, prompt - 1 + response))
            assert torch.equal(advantages[row, prompt - 1 : prompt - 1 + response], rows.advantages[i])
            assert advantages[row][~loss_mask[row]].abs().sum() == 0


@pytest.mark.parametrize("token_mean", [True, False])
@pytest.mark.parametrize("ranks, micro_batch_size, parts", [(1, 2, 1), (2, 1, 2), (2, 2, 1), (3, 1, 2)])
def test_policy_loss_scales_average_to_the_whole_mini_batch(token_mean, ranks, micro_batch_size, parts):
    """Megatron divides the sum of micro-batch losses by their count, DDP averages over ranks: a token (or
    sequence) mean per micro-batch times its scale then averages to the whole mini-batch's mean."""
    rows = _rows(((3, 4), (5, 2), (2, 6), (4, 1), (3, 3), (2, 5), (6, 2)))
    layout = mini_batch_layout(len(rows.sequences), parts, ranks, micro_batch_size)
    generator = torch.Generator().manual_seed(3)
    per_token = [torch.randn(n, generator=generator) for n in rows.response_lengths]  # any per-token loss
    for k, part in enumerate(layout):
        real = [i for share in part for i in share if i >= 0]
        expected = (torch.cat([per_token[i] for i in real]).mean() if token_mean
                    else torch.stack([per_token[i].mean() for i in real]).mean())
        averaged = 0.0
        for rank in range(ranks):
            scales = policy_loss_scales(layout, rank, rows.response_lengths, token_mean, micro_batch_size)[k]
            mine = part[rank]
            for m, scale in enumerate(scales):
                micro = [i for i in mine[m * micro_batch_size : (m + 1) * micro_batch_size]]
                tokens = [per_token[i] for i in micro if i >= 0]
                if token_mean:
                    mean = torch.cat(tokens).mean() if tokens else torch.tensor(0.0)
                else:  # seq-mean over the micro-batch's rows, fillers adding zero
                    mean = torch.stack([t.mean() for t in tokens]).sum() / micro_batch_size if tokens \
                        else torch.tensor(0.0)
                averaged += (scale * mean).item() / (len(scales) * ranks)
        assert averaged == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def _groups(valid: list[list[bool]]) -> RolloutGroups:
    valid_t = torch.tensor(valid)
    prompts, group = valid_t.shape
    sequences = [[[b + 1] * (b + 2) + [50 + j] * (j + 1) if valid[b][j] else [b + 1] * (b + 2) for j in range(group)]
                 for b in range(prompts)]
    return RolloutGroups(prompts=[[] for _ in range(prompts)], policy_prompt_ids=[[] for _ in range(prompts)],
                         policy_response_ids=[[[] for _ in range(group)] for _ in range(prompts)],
                         rm_prompt_lengths=[b + 2 for b in range(prompts)], rm_sequences=sequences, valid=valid_t,
                         truncated=torch.zeros_like(valid_t), response_lengths=torch.ones(prompts, group, dtype=torch.long),
                         skipped=Counter())


@pytest.mark.parametrize("ranks, micro_batch_size", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)])
def test_response_group_batches_cover_every_group_once_with_global_scales(ranks, micro_batch_size):
    valid = [[True, True, False], [True, False, False], [False, False, False], [True, True, True], [True, False, True]]
    groups = _groups(valid)
    trained = groups.valid.clone()
    trained[3, 2] = False  # e.g. truncated, left out of the update but still scored
    value_count = int(trained.any(dim=1).sum())
    seen_valid, seen_trained, scaled_sum, scaled_value = [], [], 0.0, 0.0
    batches_per_rank = set()
    for rank in range(ranks):
        batches = response_group_batches(groups, trained, 0.7, micro_batch_size, 0, ranks, rank)
        batches_per_rank.add(len(batches))
        assert len(batches) * micro_batch_size == prompts_per_rank(5, ranks, micro_batch_size)
        for batch in batches:
            assert batch.input_ids.shape[0] == micro_batch_size * 3 and batch.group_size == 3
            assert batch.threshold == 0.7
            seen_valid += batch.valid.tolist()
            seen_trained += batch.trained.tolist()
            # Megatron averages micro-batch losses over micro-batches x ranks: sum_scale undoes it (a sum), and
            # a sum over the micro-batch's prompts times value_scale averages to the batch mean.
            scaled_sum += batch.sum_scale
            scaled_value += batch.value_scale * batch.trained.view(-1, 3).any(1).sum().item()
            # V is read at the prompt's last token in every slot of a group, valid or not.
            for row in range(batch.input_ids.shape[0]):
                length = int(batch.prompt_lengths[row])
                assert batch.attention_mask[row, :length].all()
    assert len(batches_per_rank) == 1  # every rank runs the same number of micro-batches (the schedule needs it)
    total = batches_per_rank.pop() * ranks
    assert sum(seen_valid) == groups.valid.sum() and sum(seen_trained) == trained.sum()
    assert scaled_sum / total == pytest.approx(total) and scaled_value / total == pytest.approx(1.0)
    assert value_count == 4


def test_a_zero_count_switches_its_term_off():
    groups = _groups([[True, True], [True, False]])
    (batch,) = response_group_batches(groups, torch.zeros(2, 2, dtype=torch.bool), 0.5, 2, 0, ranks=1, rank=0)
    assert batch.value_scale == 0.0 and batch.sum_scale == 1.0
