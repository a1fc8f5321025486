"""tools/check_parity.py as a user runs it under torchrun (2 processes, gloo): it passes correct conversions of a
tiny LM (TP=2, the built-in chat sample) and of a tiny reward model with a value head (PP=2, --text FILE), fails
with exit 1 on a deliberately corrupted conversion, and refuses a layout the model's heads cannot split in one
line; fails a conversion whose Llama-3 RoPE factor is wrong on the default input; a tiny MoE reward model at
EP=2; the refusal of --sequence-parallel on the local spec; plus parity_report in-process, as a world of one."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from helpers import REPO
from safetensors.torch import load_file, save_file

from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.checkpoint.parity import chat_sequences, parity_batch, parity_failures, parity_report
from megatron_save.testing import save_tiny_hf_model

CORRUPTED_TENSOR = "model.layers.1.post_attention_layernorm.weight"


def check_parity(*args: str | Path) -> subprocess.CompletedProcess:
    """tools/check_parity.py under torchrun on 2 CPU processes; the completed launch, whatever its exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "tools/check_parity.py", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def corrupted_ckpt(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama LM converted from a copy of its HF directory with one norm weight scaled by 1.05."""
    root = tmp_path_factory.mktemp("corrupted")
    hf_copy = Path(shutil.copytree(tiny_models["llama-lm"]["hf"], root / "hf"))
    tensors = load_file(hf_copy / "model.safetensors")
    tensors[CORRUPTED_TENSOR] = tensors[CORRUPTED_TENSOR] * 1.05
    save_file(tensors, hf_copy / "model.safetensors", metadata={"format": "pt"})
    convert_hf_to_megatron(hf_copy, root / "mg")
    return root / "mg"


def test_lm_passes_at_tp2_on_the_chat_sample(tiny_models):
    result = check_parity("--ckpt", tiny_models["llama-lm"]["mg"], "--hf-dir", tiny_models["llama-lm"]["hf"],
                          "--tp", "2")
    assert result.returncode == 0, output_of(result)
    assert re.search(r"causal_lm fp32 at TP=2 PP=1, local spec, 6 sequences / \d+ tokens of the chat sample: "
                     r"max \|megatron - transformers\| \S+, rel \S+ \(rtol 1e-04\), top-1 100\.0% \(min 98\.0%\), "
                     r"max \|dlogp\| \S+, rope inverse frequencies rel 0\.0e\+00 \(max 2e-06\): OK", result.stderr), \
        output_of(result)


def test_reward_model_with_value_head_passes_at_pp2_on_a_text_file(tiny_models, tmp_path):
    text = tmp_path / "paragraphs.txt"
    text.write_text("The quick brown fox\njumps over the lazy dog.\n\nA second paragraph, one line.\n\n"
                    "x\n\nThird: numbers 1, 2, 3 and more.\n")  # "x" is one token: nothing to predict, dropped
    result = check_parity("--ckpt", tiny_models["llama-rmv"]["mg"], "--hf-dir", tiny_models["llama-rmv"]["hf"],
                          "--pp", "2", "--text", text, "--max-length", "24")
    assert result.returncode == 0, output_of(result)
    assert re.search(rf"reward_model fp32 at TP=1 PP=2, local spec, 3 sequences / 72 tokens of {re.escape(str(text))}: "
                     r"max \|reward difference\| \S+, rel \S+ \(rtol 1e-04\), max \|value difference\| \S+, "
                     r"value rel \S+ \(rtol 1e-04\), ranking agreement 100\.0% \(no top-1 for a reward model; "
                     r"not gated\), rope inverse frequencies rel 0\.0e\+00 \(max 2e-06\): OK", result.stderr), \
        output_of(result)


def test_a_corrupted_conversion_fails_with_exit_1(tiny_models, corrupted_ckpt):
    result = check_parity("--ckpt", corrupted_ckpt, "--hf-dir", tiny_models["llama-lm"]["hf"], "--tp", "2")
    assert result.returncode == 1, output_of(result)
    assert re.search(r"at TP=2 PP=1, .*: MISMATCH \(rel \S+ > rtol 1e-04", result.stderr), output_of(result)


@pytest.fixture(scope="module")
def wrong_factor_ckpt(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama LM converted from a copy of its HF directory whose Llama-3 RoPE factor says 8, not 32."""
    root = tmp_path_factory.mktemp("wrong_factor")
    hf_copy = Path(shutil.copytree(tiny_models["llama-lm"]["hf"], root / "hf"))
    config = json.loads((hf_copy / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 32.0
    config["rope_parameters"]["factor"] = 8.0
    (hf_copy / "config.json").write_text(json.dumps(config))
    convert_hf_to_megatron(hf_copy, root / "mg")
    return root / "mg"


def test_a_wrong_rope_factor_fails_on_the_default_input(tiny_models, wrong_factor_ckpt):
    """On the short chat sample the logits alone pass (RoPE's low frequencies barely turn in ~100 tokens); the
    rotary frequencies fail it."""
    result = check_parity("--ckpt", wrong_factor_ckpt, "--hf-dir", tiny_models["llama-lm"]["hf"], "--tp", "2")
    assert result.returncode == 1, output_of(result)
    verdict = re.search(r"of the chat sample: .* rel (\S+) \(rtol 1e-04\), .*: MISMATCH \(rope inverse frequencies "
                        r"rel 3\.0e\+00 > 2e-06\)", result.stderr)
    assert verdict, output_of(result)
    assert float(verdict.group(1)) < 1e-4  # the logits alone would have passed


def test_a_layout_the_heads_cannot_split_is_refused_in_one_line(tmp_path):
    hf_dir = save_tiny_hf_model("llama", tmp_path / "hf", hidden_size=48, num_attention_heads=3,
                                num_key_value_heads=3)
    convert_hf_to_megatron(hf_dir, tmp_path / "mg")
    result = check_parity("--ckpt", tmp_path / "mg", "--hf-dir", hf_dir, "--tp", "2")
    assert result.returncode != 0, output_of(result)
    refusals = [line for line in result.stderr.splitlines() if line.startswith("check_parity: ")]
    assert refusals and all("tensor_model_parallel_size=2 does not divide the 3 attention heads" in line
                            for line in refusals), output_of(result)
    # The only traceback is torchrun's own report that a rank failed: none from the ranks themselves.
    frames = re.findall(r'File "([^"]+)"', result.stderr)
    assert not [frame for frame in frames if "torch" not in frame and "runpy" not in frame], output_of(result)
    assert "ParallelLayoutError" not in result.stderr, output_of(result)
    assert "parallel layout: world" not in result.stderr  # refused before any process group


def test_moe_reward_model_passes_at_ep2(tiny_moe_models):
    model = tiny_moe_models["qwen3_moe-rmv"]
    result = check_parity("--ckpt", model["mg"], "--hf-dir", model["hf"], "--ep", "2")
    assert result.returncode == 0, output_of(result)
    assert re.search(r"reward_model fp32 at TP=1 PP=1 EP=2 ETP=1, local spec, .*: .*OK", result.stderr), \
        output_of(result)


def test_sequence_parallel_is_refused_on_the_local_spec(tiny_models):
    refusal = "sequence_parallel=true needs the Transformer Engine layer spec"
    result = check_parity("--ckpt", tiny_models["llama-lm"]["mg"], "--hf-dir", tiny_models["llama-lm"]["hf"],
                          "--tp", "2", "--sequence-parallel")
    assert result.returncode != 0, output_of(result)
    refusals = [line for line in result.stderr.splitlines() if line.startswith("check_parity: ")]
    assert refusals and all(refusal in line for line in refusals), output_of(result)


def test_parity_report_in_process(tiny_models, corrupted_ckpt, world_of_one):
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(tiny_models["llama-lm"]["mg"]) / HF_SUBDIR)
    batch = parity_batch(chat_sequences(tokenizer), tokenizer.pad_token_id, max_length=64)
    report = parity_report(tiny_models["llama-lm"]["mg"], tiny_models["llama-lm"]["hf"], batch)
    assert (report.kind, report.sequences, report.tokens) == ("causal_lm", 6, int(batch.mask.sum()))
    assert report.max_rel_diff < 1e-5 and report.top1_agreement == 1.0 and report.max_logprob_diff < 1e-5
    assert parity_failures(report, 1e-4, 0.98) == [] and report.rope_max_rel_diff == 0.0

    corrupted = parity_report(corrupted_ckpt, tiny_models["llama-lm"]["hf"], batch)
    assert corrupted.max_rel_diff > 1e-3 and parity_failures(corrupted, 1e-4, 0.98), corrupted

    values = parity_report(tiny_models["llama-rmv"]["mg"], tiny_models["llama-rmv"]["hf"], batch)
    assert values.kind == "reward_model" and values.top1_agreement is None
    assert values.value_max_rel_diff is not None and values.value_max_rel_diff < 1e-5
    assert values.max_rel_diff < 1e-5 and values.ranking_agreement == 1.0
