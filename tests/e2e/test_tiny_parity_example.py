"""The README's conversion example: examples/cpu/tiny_parity.sh, as a new user runs it (CLI tools, torchrun at TP=2)."""

from __future__ import annotations

import os
import subprocess

import torch
import transformers
from helpers import REPO


def test_tiny_parity_example(tmp_path):
    work = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(["bash", "examples/cpu/tiny_parity.sh", str(work)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "at TP=2 PP=1 (tolerance 1e-04): OK" in result.stderr

    original = transformers.AutoModelForCausalLM.from_pretrained(work / "hf").eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(work / "hf_roundtrip").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "hf_roundtrip")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported(ids).logits)
