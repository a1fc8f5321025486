"""tools/eval_rm.py with our converted reward model at TP=2 gives the HF model's numbers on a RewardBench fixture
and a JudgeBench fixture (responses scored once each, chat template, left truncation)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from helpers import REPO

from megatron_save.testing.synthetic import write_jsonl

SUBSETS = ["alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "math-prm", "hep-python"]


def _text(rng, n):
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(n))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrm")
    rng = random.Random(0)
    shared = _text(rng, 30)  # a response that appears in several pairs
    rewardbench = [{"id": i, "prompt": _text(rng, 12), "chosen": _text(rng, rng.randint(5, 40)),
                    "rejected": shared if i % 3 == 0 else _text(rng, rng.randint(5, 300)),
                    "subset": SUBSETS[i % len(SUBSETS)]} for i in range(20)]
    judgebench = [{"pair_id": i, "question": _text(rng, 10), "response_A": _text(rng, 20),
                   "response_B": _text(rng, 25), "label": rng.choice(["A>B", "B>A"]),
                   "source": rng.choice(["mmlu-pro-x", "livebench-math", "livecodebench"])} for i in range(12)]
    return write_jsonl(rewardbench, root / "rb.jsonl"), write_jsonl(judgebench, root / "jb.jsonl"), root


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]


def test_tp2_megatron_scores_match_hf(tiny_models, fixtures):
    rb, jb, root = fixtures
    data = ["--benchmark", "rewardbench", "--data", str(rb), "--benchmark", "judgebench", "--data", str(jb),
            "--max-length", "64", "--batch-size", "4"]
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "tools/eval_rm.py",
          "--ckpt", str(tiny_models["llama-rm"]["mg"]), "--tp", "2", "--out", str(root / "mg"), *data])
    _run([sys.executable, "tools/eval_rm.py", "--hf-model", str(tiny_models["llama-rm"]["hf"]),
          "--out", str(root / "hf"), *data])
    for name in ("rewardbench", "judgebench"):
        ours = [json.loads(line) for line in (root / "mg" / f"{name}.scores.jsonl").read_text().splitlines()]
        reference = [json.loads(line) for line in (root / "hf" / f"{name}.scores.jsonl").read_text().splitlines()]
        assert len(ours) == len(reference) > 0
        for a, b in zip(ours, reference):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
        summary = json.loads((root / "mg" / f"{name}.summary.json").read_text())
        reference_summary = json.loads((root / "hf" / f"{name}.summary.json").read_text())
        assert summary.pop("source").endswith("llama-rm-mg") and reference_summary.pop("source").endswith("llama-rm-hf")
        assert summary == reference_summary
        assert 0 <= summary["score"] <= 100
