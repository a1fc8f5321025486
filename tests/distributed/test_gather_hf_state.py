"""The weight-sync path: every rank rebuilds every HF tensor exactly from a TP=2 / PP=2 / TP=2 x PP=2 model, of the
local spec and with Transformer Engine's parameter names (what the ``auto`` spec builds on a GPU)."""

from __future__ import annotations

import json

from helpers import read_json, torchrun


def test_every_rank_gathers_exact_hf_tensors(tiny_models, tmp_path):
    chosen = {n: {k: str(v) for k, v in d.items()} for n, d in tiny_models.items() if n in ("llama-lm", "qwen2-lm",
                                                                                          "llama-rmv")}
    chosen["qwen3-lm+te"] = {"hf": str(tiny_models["qwen3-lm"]["hf"]), "mg": str(tiny_models["qwen3-lm"]["mg"]),
                             "te_names": "1"}
    (tmp_path / "models.json").write_text(json.dumps(chosen))
    torchrun("gather_worker.py", 4, "--models", str(tmp_path / "models.json"), "--out", str(tmp_path / "out.json"))
    results = read_json(tmp_path / "out.json")
    assert len(results) == 4 * 4 * 4  # models x layouts x ranks
    assert all(results.values()), [k for k, ok in results.items() if not ok]
