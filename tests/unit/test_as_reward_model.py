"""A causal LM made into a reward model (``--as-reward-model``), and export of a config without
``architectures`` (what transformers' GGUF loader gives)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from helpers import REPO, prompt_lengths_of, token_batch
from safetensors.torch import load_file

from megatron_save.checkpoint import read_checkpoint_meta
from megatron_save.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_save.checkpoint.hf import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR, VERIFY_ENV
from megatron_save.checkpoint.parity import max_abs_diff_vs_transformers
from megatron_save.testing import save_tiny_hf_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied embeddings
def test_causal_lm_becomes_a_reward_model(family, tmp_path, world_of_one):
    lm_dir = save_tiny_hf_model(family, tmp_path / "lm")
    meta = convert_hf_to_megatron(lm_dir, tmp_path / "rm", as_reward_model=True, reward_head_std=0.3, seed=5)
    assert (meta.kind, meta.value_head) == ("reward_model", True)
    config = read_checkpoint_meta(tmp_path / "rm")[1]
    assert config.architectures == [f"{'Llama' if family == 'llama' else 'Qwen2'}ForSequenceClassification"]
    assert config.num_labels == 1 and config.pad_token_id is not None

    exported = convert_megatron_to_hf(tmp_path / "rm", tmp_path / "rm-hf")
    lm, rm = load_file(lm_dir / "model.safetensors"), load_file(exported / "model.safetensors")
    backbone = {name for name in lm if name.startswith("model.")}
    assert set(rm) == backbone | {"score.weight"}
    assert all(torch.equal(lm[name], rm[name]) for name in backbone)
    hidden = rm["score.weight"].shape[1]
    expected_head = torch.randn(1, hidden, generator=torch.Generator().manual_seed(5)) * 0.3
    assert torch.equal(rm["score.weight"], expected_head)
    assert torch.equal(load_file(exported / VALUE_HEAD_FILE)[VALUE_HEAD_TENSOR], torch.zeros(1, hidden))

    # transformers reads the export as the reward model it is: same rewards and values as Megatron.
    input_ids, mask = token_batch()
    assert max_abs_diff_vs_transformers(tmp_path / "rm", exported, input_ids, mask,
                                        prompt_lengths=prompt_lengths_of(mask)) < 1e-5

    # The export round-trips: back to Megatron (value head kept) and out again, bit for bit.
    convert_hf_to_megatron(exported, tmp_path / "rm-again")
    again = convert_megatron_to_hf(tmp_path / "rm-again", tmp_path / "rm-hf-again")
    assert load_file(again / "model.safetensors").keys() == rm.keys()
    assert all(torch.equal(load_file(again / "model.safetensors")[name], rm[name]) for name in rm)


def test_default_reward_head_std_is_the_configs_initializer_range(tmp_path, world_of_one):
    lm_dir = save_tiny_hf_model("llama", tmp_path / "lm", initializer_range=0.07)
    convert_hf_to_megatron(lm_dir, tmp_path / "rm", as_reward_model=True)
    head = load_file(convert_megatron_to_hf(tmp_path / "rm", tmp_path / "hf") / "model.safetensors")["score.weight"]
    assert torch.equal(head, torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.07)


def test_as_reward_model_refuses_a_reward_model(tiny_models, tmp_path, world_of_one):
    with pytest.raises(ValueError, match="as_reward_model needs a causal LM"):
        convert_hf_to_megatron(tiny_models["llama-rm"]["hf"], tmp_path / "out", as_reward_model=True)


def test_add_value_head_on_a_causal_lm_points_to_as_reward_model(tiny_models, tmp_path, world_of_one):
    with pytest.raises(ValueError, match="use as_reward_model for a causal LM"):
        convert_hf_to_megatron(tiny_models["llama-lm"]["hf"], tmp_path / "out", add_value_head=True)


def test_convert_tool_as_reward_model(tmp_path):
    lm_dir = save_tiny_hf_model("qwen3", tmp_path / "lm")
    result = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(lm_dir), "--out",
                             str(tmp_path / "rm"), "--as-reward-model", "--seed", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-4000:]
    meta = json.loads((tmp_path / "rm" / "megatron_save.json").read_text())
    assert (meta["kind"], meta["value_head"]) == ("reward_model", True)


@pytest.mark.parametrize("kind", ["lm", "rm"])
def test_export_without_architectures(kind, tiny_models, tmp_path, world_of_one, monkeypatch):
    """The exported class follows from the checkpoint's kind and family when its config names none."""
    if kind == "lm":  # a config without architectures imports as a causal LM
        hf_dir = save_tiny_hf_model("llama", tmp_path / "hf")
        config = json.loads((hf_dir / "config.json").read_text())
        del config["architectures"]
        (hf_dir / "config.json").write_text(json.dumps(config))
        ckpt = tmp_path / "ckpt"
        convert_hf_to_megatron(hf_dir, ckpt)
    else:  # a reward model's checkpoint whose config lost the name: the checkpoint's kind says what it is
        ckpt = tiny_models["llama-rm"]["mg"]
        monkeypatch.setenv(VERIFY_ENV, "off")
        edited = tmp_path / "ckpt"
        shutil.copytree(ckpt, edited)
        config = json.loads((edited / HF_SUBDIR / "config.json").read_text())
        config.pop("architectures")
        (edited / HF_SUBDIR / "config.json").write_text(json.dumps(config))
        ckpt = edited
    out = convert_megatron_to_hf(ckpt, tmp_path / "export")
    expected = "LlamaForCausalLM" if kind == "lm" else "LlamaForSequenceClassification"
    assert json.loads((out / "config.json").read_text())["architectures"] == [expected]
    auto = transformers.AutoModelForCausalLM if kind == "lm" else transformers.AutoModelForSequenceClassification
    assert type(auto.from_pretrained(out)).__name__ == expected
