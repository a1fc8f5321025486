"""The recipe's data preparation (paper F.1): UltraFeedback instructions selected by completion length under each
rule, ultrafeedback_binarized pairs matched to them, the tools' outputs read back by the stages' loaders, refusals,
and the bookkeeping of a resumable responses file. Lengths are hand-counted: the tiny tokenizer is character-level
(one token per character of printable ASCII)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR, META_FILE
from megatron_save.data.loading import load_rows
from megatron_save.data.preference import load_preference_pairs
from megatron_save.data.prompts import load_prompts
from megatron_save.data.recipe_data import (
    LengthRule,
    check_length_rule,
    lengths_pass,
    match_preference_pairs,
    messages_key,
    pending_indices,
    read_complete_rows,
    select_instructions,
    stored_prompts,
    token_counter,
)
from megatron_save.testing import tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def text(length: int) -> str:
    """A response of exactly ``length`` characters (= tiny-tokenizer tokens)."""
    return ("lorem ipsum dolor sit amet " * (length // 27 + 1))[:length]


def completions(*lengths: int) -> list[dict]:
    """UltraFeedback completions: one per model, with the fields this code ignores."""
    return [{"model": f"model-{i}", "principle": "helpfulness", "custom_system_prompt": "", "response": text(n),
             "annotations": {"helpfulness": {"Rating": "4", "Rationale": "ok"}}, "fine-grained_score": 4.0}
            for i, n in enumerate(lengths)]


# Hand-counted with min 10 tokens: lengths, and whether any / all / the mean is over 10.
ULTRAFEEDBACK = [
    {"source": "evol_instruct", "instruction": "  Write a poem  ", "completions": completions(5, 12, 3, 20)},
    # ^ any: yes (12, 20); all: no; mean 10: no (not over)
    {"source": "sharegpt", "instruction": "Explain gravity", "completions": completions(11, 15)},  # yes / yes / 13
    {"source": "sharegpt", "instruction": "   ", "completions": completions(40)},  # empty instruction
    {"source": "ultrachat", "instruction": "Tell a joke", "completions": []},  # no completions
    {"source": "flan", "instruction": "Write a poem", "completions": completions(30, 30)},
    # ^ same instruction as row 0: a duplicate under any; the first passing occurrence under all and mean
    {"source": "flan", "instruction": "Summarize", "completions": completions(2, 4)},  # no / no / 3
    {"source": "flan", "instruction": None, "completions": completions(50)},  # empty instruction
    {"source": "truthful_qa", "instruction": "Translate", "completions": completions(10, 10, 40)},
    # ^ any: yes (40); all: no; mean 20: yes
]
COUNT = token_counter(tiny_tokenizer())


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def ultrafeedback(tmp_path) -> Path:
    return write_jsonl(ULTRAFEEDBACK, tmp_path / "ultrafeedback.jsonl")


def test_the_tiny_tokenizer_counts_characters():
    assert COUNT([text(0), text(12), text(1025)]) == [0, 12, 1025]


@pytest.mark.parametrize("rule, kept, failing", [
    ("any", ["Write a poem", "Explain gravity", "Translate"], 1),
    ("all", ["Explain gravity", "Write a poem"], 3),
    ("mean", ["Explain gravity", "Write a poem", "Translate"], 2),
])
def test_selection_under_each_rule_from_a_file(ultrafeedback, rule, kept, failing):
    length_rule = LengthRule(min_tokens=10, rule=rule)
    selected, report = select_instructions(load_rows(str(ultrafeedback)), COUNT, length_rule, str(ultrafeedback))
    assert selected == kept
    expected = {"empty instruction": 2, "no completions": 1, f"not {length_rule.describe()}": failing}
    if rule == "any":
        expected["duplicate instruction"] = 1
    assert dict(report.skipped) == expected
    assert (report.rows, report.kept) == (8, len(kept))
    assert report.rows == report.kept + sum(report.skipped.values())  # nothing lost silently


def test_bounds_are_over_the_minimum_and_at_most_the_maximum():
    assert not lengths_pass([1024], LengthRule(1024)) and lengths_pass([1025], LengthRule(1024))
    assert lengths_pass([1024], LengthRule(0, 1024, "all")) and not lengths_pass([1025, 3], LengthRule(0, 1024, "all"))
    mean = LengthRule(1023, rule="mean")
    assert lengths_pass([0, 2047], mean) and not lengths_pass([0, 2046], mean)
    within = LengthRule(min_tokens=0, max_tokens=12, rule="all")  # F.1's other reading: every response within
    assert select_instructions(ULTRAFEEDBACK, COUNT, within, "rows")[0] == ["Summarize"]


def test_the_limit_stops_reading():
    selected, report = select_instructions(ULTRAFEEDBACK, COUNT, LengthRule(10), "rows", limit=2)
    assert selected == ["Write a poem", "Explain gravity"] and report.rows == 2


@pytest.mark.parametrize("rule, flag", [
    (LengthRule(rule="median"), "--rule"), (LengthRule(-1), "--min-response-tokens"),
    (LengthRule(1024, 512), "--max-response-tokens"),
])
def test_a_bad_rule_names_its_flag(rule, flag):
    with pytest.raises(ValueError, match=flag):
        check_length_rule(rule)


@pytest.mark.parametrize("row, message", [
    ({"instruction": 3, "completions": completions(5)}, "row 1, field 'instruction'"),
    ({"instruction": "x", "completions": [{"model": "m"}]}, "row 1, completion 0: no 'response'"),
    ({"instruction": "x", "completions": "a string"}, "row 1, field 'completions'"),
])
def test_a_malformed_row_names_the_source_and_row(row, message):
    with pytest.raises(ValueError, match=f"uf.jsonl: {message}"):
        select_instructions([ULTRAFEEDBACK[1], row], COUNT, LengthRule(10), "uf.jsonl")


def messages(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


BINARIZED = [  # ultrafeedback_binarized rows: chosen / rejected are whole conversations
    {"prompt": " Write a poem\n", "prompt_id": "a", "chosen": messages("Write a poem", "Roses are red"),
     "rejected": messages("Write a poem", "No."), "score_chosen": 8.0, "score_rejected": 2.0},
    {"prompt": "Explain gravity", "prompt_id": "b", "chosen": messages("Explain gravity", "Mass attracts mass"),
     "rejected": messages("Explain gravity", "Magic"), "score_chosen": 9.0, "score_rejected": 1.0},
    {"prompt": "Explain gravity", "prompt_id": "c", "chosen": messages("Explain gravity", "Spacetime curves"),
     "rejected": messages("Explain gravity", "Dunno"), "score_chosen": 7.0, "score_rejected": 3.0},
    {"prompt": "Not selected", "prompt_id": "d", "chosen": messages("Not selected", "a"),
     "rejected": messages("Not selected", "b"), "score_chosen": 5.0, "score_rejected": 4.0},
    {"prompt": "Translate", "prompt_id": "e", "chosen": messages("Translate", ""),
     "rejected": messages("Translate", "nope"), "score_chosen": 5.0, "score_rejected": 4.0},
]
SELECTED = ["Write a poem", "Explain gravity", "Translate", "Unpaired"]


def test_matching_keeps_every_pair_of_a_selected_prompt_and_counts_the_rest():
    pairs, report = match_preference_pairs(BINARIZED, SELECTED, "binarized")
    assert [p["prompt"] for p in pairs] == [" Write a poem\n", "Explain gravity", "Explain gravity"]
    assert pairs[0] == {k: BINARIZED[0][k] for k in ("prompt", "chosen", "rejected")}
    assert (report.rows, report.kept, dict(report.skipped)) == (5, 3, {"prompt not selected": 1, "empty response": 1})
    assert report.selected == 4 and report.unmatched == ["Translate", "Unpaired"]  # Translate's one pair was empty


def test_a_null_response_names_the_source_and_row():
    with pytest.raises(ValueError, match="binarized: row 1 has no value for 'rejected'"):
        match_preference_pairs([BINARIZED[0], {**BINARIZED[1], "rejected": None}], SELECTED, "binarized")


def run_tool(name: str, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(REPO / "tools" / name), run_name="__main__")


@pytest.fixture
def our_checkpoint_dir(tmp_path) -> Path:
    """What the tokenizer loader needs of our checkpoint directory: the meta file and the hf/ side files."""
    ckpt = tmp_path / "policy_ckpt"
    tiny_tokenizer().save_pretrained(ckpt / HF_SUBDIR)
    (ckpt / META_FILE).write_text("{}")
    return ckpt


def test_both_tools_write_what_the_stages_read(ultrafeedback, our_checkpoint_dir, tmp_path, monkeypatch, capsys):
    prompts_file, pairs_file = tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "pairs.jsonl"
    run_tool("select_prompts.py", monkeypatch, "--data", str(ultrafeedback), "--tokenizer", str(our_checkpoint_dir),
             "--min-response-tokens", "10", "--out", str(prompts_file))
    out = capsys.readouterr().out
    assert f"{prompts_file}: 3 prompts with any completion over 10 tokens" in out
    assert "8 rows read, 3 kept, skipped: 1 duplicate instruction, 2 empty instruction, 1 no completions" in out
    assert [json.loads(line) for line in prompts_file.read_text().splitlines()] == [
        {"prompt": "Write a poem"}, {"prompt": "Explain gravity"}, {"prompt": "Translate"}]
    tokenizer = tiny_tokenizer()
    prompts, _ = load_prompts(str(prompts_file), tokenizer, max_prompt_length=256)  # stage 3 / sample-responses
    assert [p.messages for p in prompts] == [[{"role": "user", "content": "Write a poem"}],
                                             [{"role": "user", "content": "Explain gravity"}],
                                             [{"role": "user", "content": "Translate"}]]

    binarized = tmp_path / "binarized.parquet"
    import datasets

    datasets.Dataset.from_list(BINARIZED).to_parquet(str(binarized))
    run_tool("offline_pairs.py", monkeypatch, "--prompts", str(prompts_file), "--pairs", str(binarized),
             "--out", str(pairs_file))
    out = capsys.readouterr().out
    assert f"{pairs_file}: 3 pairs for 2 of 3 selected prompts" in out
    assert "1 selected prompts have no pair\n  'Translate'" in out
    pairs, report = load_preference_pairs(str(pairs_file), tokenizer, max_length=256)  # stage 1, reward.offline_data
    assert len(pairs) == report.kept == 3


def test_the_tools_refuse_naming_the_flag_the_file_and_the_field(ultrafeedback, our_checkpoint_dir, tmp_path,
                                                                  monkeypatch):
    with pytest.raises(SystemExit, match="--rule 'median' is not one of any, all, mean"):
        run_tool("select_prompts.py", monkeypatch, "--data", str(ultrafeedback), "--rule", "median")
    with pytest.raises(SystemExit, match="--tokenizer .*missing_dir: no tokenizer there"):
        run_tool("select_prompts.py", monkeypatch, "--data", str(ultrafeedback), "--tokenizer",
                 str(tmp_path / "missing_dir"))
    no_completions = write_jsonl([{"instruction": "x"}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="bad.jsonl: rows have no 'completions' field"):
        run_tool("select_prompts.py", monkeypatch, "--data", str(no_completions), "--tokenizer",
                 str(our_checkpoint_dir))
    with pytest.raises(SystemExit, match="no instruction of .* has any completion over 5000 tokens"):
        run_tool("select_prompts.py", monkeypatch, "--data", str(ultrafeedback), "--tokenizer",
                 str(our_checkpoint_dir), "--min-response-tokens", "5000", "--out", str(tmp_path / "none.jsonl"))
    assert not (tmp_path / "none.jsonl").exists()
    prompts = write_jsonl([{"prompt": "Explain gravity"}], tmp_path / "prompts.jsonl")
    no_rejected = write_jsonl([{k: v for k, v in BINARIZED[1].items() if k != "rejected"}], tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match="pairs.jsonl: rows have no 'rejected' field"):
        run_tool("offline_pairs.py", monkeypatch, "--prompts", str(prompts), "--pairs", str(no_rejected))


def test_a_torn_last_line_is_left_out_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "responses.jsonl"
    whole = "".join(json.dumps({"prompt": p, "responses": ["r"]}) + "\n" for p in ("a", "b"))
    path.write_text(whole + '{"prompt": "c", "respon')
    rows, complete = read_complete_rows(path)
    assert [r["prompt"] for r in rows] == ["a", "b"] and complete == len(whole.encode())
    assert read_complete_rows(tmp_path / "absent.jsonl") == ([], 0)
    path.write_text(whole + "not json\n" + whole)
    with pytest.raises(ValueError, match="responses.jsonl, line 3: not valid JSON"):
        read_complete_rows(path)


def test_pending_prompts_count_occurrences():
    keys = [messages_key(p) for p in ("a", "b", "a", "c")]
    assert pending_indices(keys, [messages_key("a"), messages_key([{"role": "user", "content": "b"}])]) == [2, 3]
    assert pending_indices(keys, []) == [0, 1, 2, 3]


def test_stored_prompts_keep_one_type_per_file():
    lone = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    with_system = [[{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], lone[1]]
    assert stored_prompts(lone) == ["a", "b"]
    assert stored_prompts(with_system) == with_system
