"""The pure parts of the parity check: relative difference, top-1 and ranking agreement, next-token log-probs,
the batch of real text and the verdict, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_save.checkpoint.parity import (
    CHAT_SAMPLE,
    ParityReport,
    causal_lm_report,
    chat_sequences,
    max_abs_difference,
    next_token_logprobs,
    parity_batch,
    parity_failures,
    ranking_agreement,
    relative_difference,
    render_plain,
    reward_model_report,
    text_paragraphs,
    top1_agreement,
    verdict_line,
)
from megatron_save.testing.tiny_models import tiny_tokenizer


def test_relative_difference_is_max_error_over_max_reference_on_real_tokens():
    reference = torch.tensor([[[4.0, -8.0], [1.0, 0.0]], [[2.0, 2.0], [100.0, 100.0]]])  # [B=2, S=2, V=2]
    ours = reference + torch.tensor([[[0.0, 0.5], [-0.25, 0.0]], [[0.1, 0.0], [50.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, False]])  # the last token (|ref| 100, error 50) is padding
    assert max_abs_difference(ours, reference, mask) == pytest.approx(0.5)
    assert relative_difference(ours, reference, mask) == pytest.approx(0.5 / 8.0)
    assert relative_difference(ours, reference) == pytest.approx(50.0 / 100.0)  # no mask: every entry


def test_relative_difference_of_zeros_and_nan():
    zeros = torch.zeros(3)
    assert relative_difference(zeros, zeros) == 0.0
    assert relative_difference(torch.tensor([0.0, 1.0, 0.0]), zeros) == math.inf
    assert math.isnan(relative_difference(torch.tensor([float("nan"), 1.0, 0.0]), torch.ones(3)))


def test_top1_agreement_counts_real_tokens_only():
    reference = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])  # argmax 1, 0, 2
    ours = torch.tensor([[[0.0, 1.0, 0.5], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]])  # argmax 1, 1, 0
    assert top1_agreement(ours, reference, torch.tensor([[True, True, True]])) == pytest.approx(1 / 3)
    assert top1_agreement(ours, reference, torch.tensor([[True, False, False]])) == 1.0


def test_next_token_logprobs():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1.0, 1.0, 1.0]]]))  # [1, 3, 3]
    input_ids = torch.tensor([[0, 1, 2]])
    expected = torch.log(torch.tensor([[0.25, 0.8]]))  # p(token 1 | pos 0), p(token 2 | pos 1)
    assert torch.allclose(next_token_logprobs(logits, input_ids), expected)


def test_ranking_agreement_over_untied_pairs():
    reference = torch.tensor([1.0, 2.0, 3.0, 3.0])  # pairs (2, 3) tie: 5 pairs count
    assert ranking_agreement(reference + 0.01, reference) == 1.0
    assert ranking_agreement(torch.tensor([1.0, 2.0, 1.5, 9.0]), reference) == pytest.approx(4 / 5)  # (1, 2) flips
    assert ranking_agreement(torch.zeros(3), torch.zeros(3)) == 1.0


def test_causal_lm_report_and_verdict():
    input_ids = torch.tensor([[0, 1, 2], [2, 1, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    reference = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0))
    ours = reference.clone()
    ours[0, 0, 0] += 0.5
    report = causal_lm_report(ours, next_token_logprobs(ours, input_ids), reference, input_ids, mask)
    assert (report.kind, report.sequences, report.tokens) == ("causal_lm", 2, 5)
    assert report.max_abs_diff == pytest.approx(0.5)
    assert report.max_rel_diff == pytest.approx(0.5 / reference[mask].abs().max().item())
    assert report.max_logprob_diff > 0.0 and report.ranking_agreement is None
    assert parity_failures(report, rtol=1.0, min_top1=0.5) == []
    assert verdict_line(report, 1.0, 0.5).endswith(": OK")
    line = verdict_line(report, 1e-4, 0.98)
    assert "(rtol 1e-04)" in line and "(min 98.0%)" in line and ": MISMATCH (rel " in line


def test_reward_model_report_with_values():
    reference = torch.tensor([[1.0, 10.0], [2.0, -20.0], [3.0, 5.0]])  # [B, (reward, value)]
    ours = reference + torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 2.0]])  # rewards 1, 3.5, 3: pair (1, 2) flips
    report = reward_model_report(ours, reference, torch.ones(3, 4, dtype=torch.bool))
    assert (report.kind, report.sequences, report.tokens) == ("reward_model", 3, 12)
    assert report.max_abs_diff == pytest.approx(1.5) and report.max_rel_diff == pytest.approx(1.5 / 3.0)
    assert report.value_max_abs_diff == pytest.approx(2.0) and report.value_max_rel_diff == pytest.approx(2 / 20)
    assert report.ranking_agreement == pytest.approx(2 / 3) and report.top1_agreement is None
    assert parity_failures(report, rtol=0.5, min_top1=0.99) == []  # ranking and top-1 are not gated for an RM
    assert parity_failures(report, rtol=0.09, min_top1=0.0) == ["rel 5.0e-01 > rtol 9e-02",
                                                                "value rel 1.0e-01 > rtol 9e-02"]
    no_values = reward_model_report(ours[:, 0], reference[:, 0], torch.ones(3, 4, dtype=torch.bool))
    assert no_values.value_max_abs_diff is None and no_values.value_max_rel_diff is None
    assert "no top-1 for a reward model" in verdict_line(no_values, 0.5, 0.98)


def test_nan_fails():
    report = ParityReport(kind="causal_lm", sequences=1, tokens=2, max_abs_diff=math.nan, max_rel_diff=math.nan,
                          top1_agreement=1.0, max_logprob_diff=math.nan)
    assert parity_failures(report, 1e-4, 0.98) == ["rel nan > rtol 1e-04"]


def test_text_paragraphs():
    text = "first line\nsecond line\n\n  \n\r\nnext one\n\n\n"
    assert text_paragraphs(text) == ["first line\nsecond line", "next one"]


def test_chat_sample_renders_with_the_template_or_as_plain_text():
    tokenizer = tiny_tokenizer()
    with_template = chat_sequences(tokenizer)
    assert len(with_template) == len(CHAT_SAMPLE)
    assert tokenizer.decode(with_template[0]).startswith("<s><|user|>What is the capital")
    tokenizer.chat_template = None
    plain = chat_sequences(tokenizer)
    assert tokenizer.decode(plain[0]) == render_plain(CHAT_SAMPLE[0])
    assert render_plain(CHAT_SAMPLE[0]).startswith("User: What is the capital of France?\n\nAssistant: ")
    assert tokenizer.unk_token_id not in {token for sequence in with_template + plain for token in sequence}


def test_parity_batch_cuts_pads_and_drops_single_tokens():
    batch = parity_batch([[5, 6, 7, 8], [9], [3, 4]], pad_id=0, max_length=3)
    assert batch.input_ids.tolist() == [[5, 6, 7], [3, 4, 0]]
    assert batch.mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.prompt_lengths.tolist() == [1, 1]
    with pytest.raises(ValueError, match="no sequence of at least 2 tokens"):
        parity_batch([[1], []], pad_id=0, max_length=8)
    with pytest.raises(ValueError, match="max_length=1"):
        parity_batch([[1, 2]], pad_id=0, max_length=1)
