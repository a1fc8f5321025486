"""SFT, stage 1 and stage 2 share one ``data`` group (DataSettings): the same keys, the same held-out rule, and
every launcher that sets them (the example YAML files, the testbed pipeline) uses the nested keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.config import load_config
from megatron_save.testing import save_tiny_hf_model
from megatron_save.testbed.pipeline import TestbedConfig, seed_steps
from megatron_save.trainers.common import DataSettings, load_examples
from megatron_save.trainers.sft import SFTConfig, train_sft
from megatron_save.trainers.stage1_bt import Stage1Config
from megatron_save.trainers.stage2_value import Stage2Config
from megatron_save.trainers.stage3 import Stage3Config

SCHEMAS = {"sft": SFTConfig, "stage1": Stage1Config, "stage2": Stage2Config, "stage3": Stage3Config}


@pytest.mark.parametrize("schema", [SFTConfig, Stage1Config, Stage2Config])
def test_the_data_keys_are_one_nested_group(schema, tmp_path):
    config = load_config(schema, None, ["checkpoint=c", "output_dir=o", "data.train_data=t", "data.eval_data=e",
                                        "data.split=s", "data.max_length=7", "data.eval_fraction=0.5"])
    assert config.data == DataSettings(train_data="t", split="s", eval_data="e", eval_fraction=0.5, max_length=7)
    path = tmp_path / "flat.yaml"
    path.write_text("train_data: t\n")  # the keys before the data group
    with pytest.raises(ValueError, match="train_data"):
        load_config(schema, path)


def test_stage2_holds_out_a_tenth_by_default():
    assert Stage2Config().data.eval_fraction == 0.1
    assert SFTConfig().data.eval_fraction == Stage1Config().data.eval_fraction == 0.05


def _loader(files: dict[str, list[int]], calls: list):
    def load(path, tokenizer, max_length, split):
        calls.append((path, tokenizer, max_length, split))
        return files[path], "report"
    return load


def test_held_out_examples_come_from_eval_data_or_the_head_of_train_data():
    calls = []
    load = _loader({"train": list(range(10)), "eval": [100, 101], "empty": []}, calls)
    settings = DataSettings(train_data="train", split="s", max_length=9, eval_fraction=0.2)
    assert load_examples(settings, load, "tok") == (list(range(2, 10)), [0, 1])
    assert calls == [("train", "tok", 9, "s")]
    settings.eval_data = "eval"
    assert load_examples(settings, load, "tok") == (list(range(10)), [100, 101])
    assert calls[-1] == ("eval", "tok", 9, "s")
    settings.eval_data = "empty"
    with pytest.raises(ValueError, match="data.eval_data empty: no examples"):
        load_examples(settings, load, "tok")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        load_examples(DataSettings(train_data="train", eval_fraction=0.01), load, "tok")


class _RecordingSteps:
    """Steps that record the commands instead of running them."""

    def __init__(self):
        self.commands = []

    def run(self, name, command=None, action=None, outputs=()):
        if command is not None:
            self.commands.append(command)


def test_the_testbed_pipeline_overrides_are_keys_of_each_trainer(tmp_path):
    """Every trainer command of one seed loads with its YAML and the pipeline's overrides, nothing missing."""
    steps = _RecordingSteps()
    seed_steps(TestbedConfig(output_dir=str(tmp_path)), steps, seed=3)
    trainers = [c[c.index("megatron_save") + 1:] for c in steps.commands if c[c.index("megatron_save") + 1] in SCHEMAS]
    assert sorted({c[0] for c in trainers}) == sorted(SCHEMAS)
    for command, yaml, *overrides in trainers:
        config = load_config(SCHEMAS[command], yaml, overrides)
        if command != "stage3":
            assert config.data.train_data.startswith(str(tmp_path)) and config.batch.seed == 3


EXAMPLES = {"cpu/stage1_bt.yaml": Stage1Config, "cpu/stage2_value.yaml": Stage2Config,
            "paper/stage1_bt.yaml": Stage1Config, "paper/stage2_value_anchor.yaml": Stage2Config,
            "testbed/sft.yaml": SFTConfig, "testbed/stage1_bt.yaml": Stage1Config,
            "testbed/stage2_value.yaml": Stage2Config}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_configs_load(name):
    """Each example loads with the config loader (the testbed's, with the paths the pipeline fills in)."""
    path = Path(__file__).resolve().parents[2] / "examples" / name
    config = load_config(EXAMPLES[name], path, ["checkpoint=c", "output_dir=o", "data.train_data=t"]
                         if name.startswith("testbed/") else [])
    assert isinstance(config.data, DataSettings) and config.data.train_data


def test_sft_trains_on_all_of_train_data_when_eval_data_is_set(tmp_path):
    """SFT gained data.eval_data with the shared group: set, no training row is held out; unset, a fraction is."""
    convert_hf_to_megatron(save_tiny_hf_model("llama", tmp_path / "hf"), tmp_path / "lm")
    for name, count in (("train", 40), ("eval", 6)):
        rows = [{"prompt": f"say {i}", "response": "a e i o"[: 1 + i % 7]} for i in range(count)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def run(output_dir, **data):
        return train_sft(load_config(SFTConfig, None, [
            f"checkpoint={tmp_path / 'lm'}", f"output_dir={tmp_path / output_dir}",
            f"data.train_data={tmp_path / 'train.jsonl'}", "batch.global_batch_size=8", "batch.micro_batch_size=4",
            *[f"data.{key}={value}" for key, value in data.items()]]))

    assert len(run("with_eval", eval_data=tmp_path / "eval.jsonl")["train"]) == 40 // 8
    assert len(run("held_out", eval_fraction=0.2)["train"]) == 32 // 8
