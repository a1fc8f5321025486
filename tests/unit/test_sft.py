"""Supervised fine-tuning pieces: demonstrations with counted skips and clear errors, the response-token mask,
and the loss against a direct log-softmax computation."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_save.data.demonstrations import Demonstration, load_demonstrations
from megatron_save.testing import tiny_tokenizer
from megatron_save.trainers.sft import demonstration_batch, response_loss_mask, sft_loss


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_demonstrations_locate_the_response_and_count_skips(tmp_path):
    tokenizer = tiny_tokenizer()
    source = _write(tmp_path / "demos.jsonl", [{"prompt": "hi", "response": "aei"}, {"prompt": "x", "response": " "},
                                               {"prompt": "long", "response": "a" * 200}])
    demonstrations, report = load_demonstrations(source, tokenizer, max_length=64)
    assert report.rows == 3 and report.kept == 1
    assert report.skipped == {"empty response": 1, "longer than 64 tokens": 1}
    (demo,) = demonstrations
    # The response is its three characters and the end token, right after the generation prompt.
    assert tokenizer.decode(demo.ids[demo.prompt_length:]) == "aei</s>"


def test_demonstrations_without_a_response_field_name_the_file(tmp_path):
    source = _write(tmp_path / "bad.jsonl", [{"prompt": "hi", "answer": "a"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: rows have no 'response' field"):
        load_demonstrations(source, tiny_tokenizer(), max_length=64)


def test_response_loss_mask_hand_computed():
    demos = [Demonstration(ids=[1, 5, 6, 7, 8, 2], prompt_length=3), Demonstration(ids=[1, 5, 9, 2], prompt_length=2)]
    mask = response_loss_mask(demos, width=6)
    # Shifted frame: position t predicts token t + 1; response tokens are ids[prompt_length:].
    assert mask.tolist() == [[False, False, True, True, True], [False, True, True, False, False]]


def test_sft_loss_is_the_mean_response_token_nll(world_of_one):
    torch.manual_seed(0)
    demos = [Demonstration(ids=[1, 5, 6, 7, 8, 2], prompt_length=3), Demonstration(ids=[1, 5, 9, 2], prompt_length=2)]
    batch = demonstration_batch(demos, pad_id=0)
    logits = torch.randn(2, 6, 11)
    loss, metrics = sft_loss(batch, logits)
    logp = torch.log_softmax(logits, dim=-1)
    terms = [-logp[row, t, demo.ids[t + 1]] for row, demo in enumerate(demos)
             for t in range(demo.prompt_length - 1, len(demo.ids) - 1)]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    assert metrics["loss"] is loss
