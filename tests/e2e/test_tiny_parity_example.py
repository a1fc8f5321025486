"""The README's conversion example: examples/cpu/tiny_parity.sh, as a new user runs it (CLI tools, torchrun at TP=2)."""

from __future__ import annotations

import os
import re
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
    assert re.search(r"causal_lm fp32 at TP=2 PP=1, local spec, \d+ sequences / \d+ tokens of the chat sample: .*"
                     r"rel \S+ \(rtol 1e-04\), top-1 100\.0% \(min 98\.0%\), max \|dlogp\| \S+, "
                     r"rope inverse frequencies rel \S+ \(max 2e-06\): OK",
                     result.stderr), result.stderr[-3000:]

    original = transformers.AutoModelForCausalLM.from_pretrained(work / "hf").eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(work / "hf_roundtrip").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "hf_roundtrip")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported(ids).logits)
