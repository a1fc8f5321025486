"""Preference and response-group data: formats, chat rendering, bad rows, batching."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_save.data.batching import PairBatch, length_grouped_batches
from megatron_save.data.chat import conversation, encode_conversation, encode_prompt
from megatron_save.data.preference import load_preference_pairs
from megatron_save.data.response_groups import load_response_groups
from megatron_save.testing import tiny_tokenizer
from megatron_save.testing.synthetic import write_jsonl
from megatron_save.utils.tensors import pad_rows

TOKENIZER = tiny_tokenizer()


def test_rendering_follows_the_chat_template():
    messages = conversation("hi", "yo")
    assert TOKENIZER.apply_chat_template(messages, tokenize=False) == "<s><|user|>hi</s><|assistant|>yo</s>"
    ids = encode_conversation(TOKENIZER, messages)
    assert ids[0] == TOKENIZER.bos_token_id and ids.count(TOKENIZER.bos_token_id) == 1
    assert ids[: len(encode_prompt(TOKENIZER, "hi"))] == encode_prompt(TOKENIZER, "hi")  # prompt is a prefix


def test_a_duplicated_bos_is_dropped_as_reward_bench_does():
    adds_bos = tiny_tokenizer(adds_bos=True)
    text = adds_bos.apply_chat_template(conversation("hi", "yo"), tokenize=False)
    assert adds_bos(text)["input_ids"][:2] == [adds_bos.bos_token_id] * 2  # template BOS + tokenizer BOS
    assert encode_conversation(adds_bos, conversation("hi", "yo")) == encode_conversation(TOKENIZER, conversation("hi", "yo"))
    assert encode_prompt(adds_bos, "hi") == encode_prompt(TOKENIZER, "hi")


def test_message_list_rows_equal_string_rows(tmp_path):
    strings = write_jsonl([{"prompt": "hi", "chosen": "good", "rejected": "bad"}], tmp_path / "s.jsonl")
    chats = write_jsonl([{
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad"}],
    }], tmp_path / "c.jsonl")
    (a,), _ = load_preference_pairs(str(strings), TOKENIZER, 64)
    (b,), _ = load_preference_pairs(str(chats), TOKENIZER, 64)
    assert a == b


def test_json_and_parquet_load_like_jsonl(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}] * 3
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.json", "d.parquet"):
        pairs, report = load_preference_pairs(str(tmp_path / name), TOKENIZER, 64)
        assert len(pairs) == 3 and report.kept == 3


def test_missing_field_names_file_and_field(tmp_path):
    path = write_jsonl([{"prompt": "p", "chosen": "a"}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl: rows have no 'rejected' field"):
        load_preference_pairs(str(path), TOKENIZER, 64)


def test_null_value_names_file_row_and_field(tmp_path):
    path = write_jsonl([{"prompt": "p", "chosen": "a", "rejected": "b"},
                        {"prompt": "p", "chosen": None, "rejected": "b"}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1 has no value for 'chosen'"):
        load_preference_pairs(str(path), TOKENIZER, 64)


def test_string_rows_without_prompt_are_refused(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]
    path = write_jsonl([{"chosen": chat, "rejected": chat}, {"chosen": "a", "rejected": "b"}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="row 1 has no 'prompt' field"):
        load_preference_pairs(str(path), TOKENIZER, 64)


def test_empty_and_over_length_rows_are_counted_skips(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "fine", "rejected": "also"},
        {"prompt": "p", "chosen": "  ", "rejected": "b"},
        {"prompt": "p", "chosen": "x" * 100, "rejected": "b"},
    ]
    pairs, report = load_preference_pairs(str(write_jsonl(rows, tmp_path / "d.jsonl")), TOKENIZER, 40)
    assert len(pairs) == 1
    assert report.rows == 3 and report.kept == 1
    assert report.skipped == {"empty response": 1, "longer than 40 tokens": 1}


def test_response_groups_skip_bad_responses_and_empty_prompts(tmp_path):
    rows = [
        {"prompt": "a", "responses": ["one", "", "two"]},
        {"prompt": "b", "responses": ["", " "]},
        {"prompt": "c", "responses": ["y" * 100]},
    ]
    groups, report = load_response_groups(str(write_jsonl(rows, tmp_path / "g.jsonl")), TOKENIZER, 40)
    assert len(groups) == 1 and len(groups[0].sequence_ids) == 2
    assert report.skipped == {"empty response": 3, "response longer than 40 tokens": 1,
                              "prompt without a usable response": 2}
    bad = write_jsonl([{"prompt": "a", "responses": "one"}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="row 0: 'responses' must be a list"):
        load_response_groups(str(bad), TOKENIZER, 40)


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        load_preference_pairs(str(path), TOKENIZER, 40)


def test_length_grouped_batches_cover_everything_once():
    lengths = [i % 17 for i in range(100)]
    batches = length_grouped_batches(lengths, 8, seed=0, group_factor=4)
    flat = [i for b in batches for i in b]
    assert len(batches) == 12 and len(set(flat)) == 96  # 100 // 8 full batches, 4 examples dropped
    assert length_grouped_batches(lengths, 8, seed=0, group_factor=4) == batches
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 8  # random batches of 8 from 0..16 would spread about 13


def test_pad_and_split():
    input_ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0, length=4)
    assert input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.sum(dim=1).tolist() == [3, 1]
    parts = PairBatch(input_ids, mask).split(1)
    assert len(parts) == 2 and torch.equal(parts[1].input_ids, input_ids[1:])
    with pytest.raises(ValueError, match="do not split"):
        PairBatch(input_ids, mask).split(3)
