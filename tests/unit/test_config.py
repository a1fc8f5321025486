"""YAML + key=value overrides into typed configs."""

from __future__ import annotations

import pytest

from megatron_save.config import ParallelConfig, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tensor_model_parallel_size: 2\nseed: 7\n")
    config = load_config(ParallelConfig, path, ["pipeline_model_parallel_size=4", "seed=9"])
    assert isinstance(config, ParallelConfig)
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.seed) == (2, 4, 9)


def test_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tensor_parallel: 2\n")
    with pytest.raises(ValueError, match="bad.yaml.*tensor_parallel"):
        load_config(ParallelConfig, path)


def test_bad_override_is_named():
    with pytest.raises(ValueError, match="override 'seed=abc'"):
        load_config(ParallelConfig, None, ["seed=abc"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(ParallelConfig, None, ["seed"])
