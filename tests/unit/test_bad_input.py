"""Bad input gets an error naming the file, row and field (or a counted skip), before any model is built."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_save.checkpoint import read_checkpoint_meta
from megatron_save.config import load_config
from megatron_save.data.preference import load_preference_pairs
from megatron_save.data.prompts import load_prompts
from megatron_save.testing import tiny_tokenizer
from megatron_save.testing.synthetic import write_jsonl
from megatron_save.trainers.common import check_settings
from megatron_save.trainers.stage3 import Stage3Config

TOKENIZER = tiny_tokenizer()


def test_a_non_string_field_is_named(tmp_path):
    source = write_jsonl([{"prompt": "fine"}, {"prompt": 5}], tmp_path / "prompts.jsonl")
    with pytest.raises(ValueError, match=r"prompts.jsonl: row 1, field 'prompt': expected a string or chat "
                                         r"messages .*got int '5'"):
        load_prompts(str(source), TOKENIZER, 64)
    source = write_jsonl([{"prompt": [{"role": "user", "content": 3}]}], tmp_path / "messages.jsonl")
    with pytest.raises(ValueError, match="messages.jsonl: row 0, field 'prompt'"):
        load_prompts(str(source), TOKENIZER, 64)


@pytest.mark.parametrize("content, message", [
    (b"", r"bad.jsonl: empty data file"),
    (b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n', r"bad.jsonl, line 2: bytes that are not UTF-8"),
    (b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n{"prompt": "c"}\n', r"bad.jsonl, line 3: not valid JSON"),
])
def test_unreadable_data_files_are_named_with_the_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(tmp_path / "bad.jsonl"), TOKENIZER, 64)


def test_a_json_array_file_still_loads(tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}]))
    prompts, _ = load_prompts(str(tmp_path / "prompts.json"), TOKENIZER, 64)
    assert len(prompts) == 2


def test_a_pair_with_an_empty_prompt_is_skipped_and_counted(tmp_path):
    source = write_jsonl([{"prompt": "q", "chosen": "a", "rejected": "b"},
                          {"prompt": "  ", "chosen": "a", "rejected": "b"},
                          {"prompt": [], "chosen": "a", "rejected": "b"}], tmp_path / "pairs.jsonl")
    pairs, report = load_preference_pairs(str(source), TOKENIZER, 256)
    assert len(pairs) == 1 and report.skipped["empty prompt"] == 2


def _stage3(tmp_path, tiny_models, *overrides):
    return load_config(Stage3Config, [], [f"output_dir={tmp_path / 'run'}", f"train_data={tmp_path / 'p.jsonl'}",
                                          f"policy.checkpoint={tiny_models['llama-lm']['mg']}",
                                          f"reward.checkpoint={tiny_models['llama-rmv']['mg']}", *overrides])


def test_settings_are_refused_before_any_model(tmp_path, tiny_models):
    write_jsonl([{"prompt": "q"}], tmp_path / "p.jsonl")
    check_settings(_stage3(tmp_path, tiny_models))
    with pytest.raises(ValueError, match=r"policy.optim: lr=-0.001"):
        check_settings(_stage3(tmp_path, tiny_models, "policy.optim.lr=-1e-3"))
    with pytest.raises(ValueError, match=r"reward.prime.optim: .*decay_style='cosin'"):
        check_settings(_stage3(tmp_path, tiny_models, "reward.prime.optim.decay_style=cosin"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"output_dir=.*file is a file"):
        check_settings(_stage3(tmp_path, tiny_models, f"output_dir={tmp_path / 'file'}"))
    with pytest.raises(FileNotFoundError, match=r"train_data=.*nothing.jsonl: no such data file"):
        check_settings(_stage3(tmp_path, tiny_models, f"train_data={tmp_path / 'nothing.jsonl'}"))
    with pytest.raises(FileNotFoundError, match=r"reward.checkpoint=.*: not a model checkpoint"):
        check_settings(_stage3(tmp_path, tiny_models, f"reward.checkpoint={tmp_path}"))


def test_a_damaged_checkpoint_description_is_named(tmp_path, tiny_models):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_models["llama-lm"]["mg"], checkpoint)
    (checkpoint / "megatron_save.json").write_text('{"family": "llama", "kind"')
    with pytest.raises(ValueError, match=r"ckpt/megatron_save.json: not a valid checkpoint description"):
        read_checkpoint_meta(checkpoint)
    (checkpoint / "megatron_save.json").write_text('{"family": "llama", "shape": 3}')
    with pytest.raises(ValueError, match=r"ckpt/megatron_save.json: not a valid checkpoint description"):
        read_checkpoint_meta(checkpoint)
    shutil.copy(tiny_models["llama-lm"]["mg"] / "megatron_save.json", checkpoint / "megatron_save.json")
    (checkpoint / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/hf/config.json: missing"):
        read_checkpoint_meta(checkpoint)
