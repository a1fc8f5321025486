"""Example YAML files hold only what differs from the defaults: a key set to its schema's default is an error
(a reader could not tell what the paper's setting changes). Required keys (MISSING defaults) are always allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from megatron_save.planning.study import StudyConfig
from megatron_save.testbed.pipeline import TestbedConfig
from megatron_save.trainers.sample_responses import SampleResponsesConfig
from megatron_save.trainers.sft import SFTConfig
from megatron_save.trainers.stage1_bt import Stage1Config
from megatron_save.trainers.stage2_value import Stage2Config
from megatron_save.trainers.stage3 import Stage3Config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCHEMAS = {
    "cpu/stage1_bt.yaml": Stage1Config, "cpu/stage2_value.yaml": Stage2Config, "cpu/stage3_save.yaml": Stage3Config,
    "paper/stage1_bt.yaml": Stage1Config, "paper/stage2_value_anchor.yaml": Stage2Config,
    "paper/stage3_save.yaml": Stage3Config, "paper/sample_responses.yaml": SampleResponsesConfig,
    "rollout/vllm.yaml": Stage3Config,
    "scaling/stage3_8b.yaml": Stage3Config, "scaling/stage3_70b.yaml": Stage3Config,
    "scaling/stage3_qwen3_30b_a3b.yaml": Stage3Config, "scaling/stage3_qwen3_235b_a22b.yaml": Stage3Config,
    "scaling/stage3_4b.yaml": Stage3Config, "scaling/study_qwen3.yaml": StudyConfig,
    "testbed/sft.yaml": SFTConfig, "testbed/stage1_bt.yaml": Stage1Config, "testbed/stage2_value.yaml": Stage2Config,
    "testbed/stage3.yaml": Stage3Config, "testbed/full.yaml": TestbedConfig,
    "testbed/gold_testbed.yaml": TestbedConfig, "testbed/lagged.yaml": TestbedConfig,
    "testbed/decisive_regime1.yaml": TestbedConfig, "testbed/decisive_regime2.yaml": TestbedConfig,
    "testbed/dose_response.yaml": TestbedConfig, "testbed/large_lr.yaml": TestbedConfig,
    "cpu/real_smollm2/stage1_bt.yaml": Stage1Config, "cpu/real_smollm2/stage2_value.yaml": Stage2Config,
    "cpu/real_smollm2/stage3_save.yaml": Stage3Config,
    **{f"algorithms/{p.name}": Stage3Config for p in (EXAMPLES / "algorithms").glob("*.yaml")},
}


def restated_defaults(values: DictConfig, defaults: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``values`` whose value equals the default (MISSING defaults never count)."""
    found = []
    for key in values:
        name = f"{prefix}{key}"
        if OmegaConf.is_missing(defaults, key) or OmegaConf.is_missing(values, key):
            continue
        value, default = values[key], defaults[key]
        if isinstance(value, DictConfig) and isinstance(default, DictConfig):
            found += restated_defaults(value, default, f"{name}.")
        elif value == default:
            found.append(name)
    return found


def test_every_example_yaml_has_a_schema():
    assert sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.yaml")) == sorted(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_examples_hold_only_what_differs_from_the_defaults(name):
    values = OmegaConf.load(EXAMPLES / name) or OmegaConf.create({})
    defaults = OmegaConf.structured(SCHEMAS[name])
    assert restated_defaults(values, defaults) == [], f"examples/{name} restates defaults"


def test_the_checker_finds_a_restated_default():
    defaults = OmegaConf.structured(Stage3Config)
    values = OmegaConf.create({"seed": 1234, "reward": {"strategy": "save", "initial_margin": 0.4},
                               "output_dir": "anything"})
    assert restated_defaults(values, defaults) == ["seed", "reward.strategy"]
