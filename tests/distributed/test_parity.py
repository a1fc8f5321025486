"""Megatron == transformers after conversion, at TP=1, TP=2, PP=2 and TP=2 x PP=2 (4 gloo processes).

One torchrun launch checks every tiny model at every layout (imports dominate the cost on CPU); each
(model, layout) pair is then its own test. The same launch re-saves every model after a TP=2 x PP=2 load,
for the round-trip test.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LAYOUTS, read_json, torchrun
from safetensors.torch import load_file

from megatron_save.checkpoint.convert import convert_megatron_to_hf
from megatron_save.checkpoint.hf import VALUE_HEAD_FILE
from megatron_save.testing import TINY_FAMILIES

TOLERANCE = 1e-4
# "-rmv": a reward model with a value head; R and V are both compared.
MODELS = [f"{family}-{kind}" for family in TINY_FAMILIES for kind in ("lm", "rm")] + ["llama-rmv"]


@pytest.fixture(scope="module")
def parity_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    models_file = root / "models.json"
    models_file.write_text(json.dumps({n: {k: str(v) for k, v in d.items()} for n, d in tiny_models.items()}))
    torchrun("parity_worker.py", 4, "--models", str(models_file), "--out", str(root / "diffs.json"),
             "--resave-layout", "tp2pp2", "--resave-root", str(root / "resaved"))
    return read_json(root / "diffs.json"), root / "resaved"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_megatron_matches_transformers(parity_run, model, layout):
    diffs, _ = parity_run
    key = f"{model}/{layout}"
    assert key in diffs, f"no result for {key}"
    assert diffs[key] <= TOLERANCE, f"{key}: max |megatron - transformers| = {diffs[key]:.3e}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", [m for m in MODELS if m.endswith("-lm")])
def test_policy_logprobs_and_entropy_match_transformers(parity_run, model, layout):
    """Per-token log-probs through Megatron's vocab-parallel cross entropy, and the vocab-parallel entropy."""
    diffs, _ = parity_run
    for stat in ("logp", "entropy"):
        key = f"{model}/{layout}/{stat}"
        assert key in diffs, f"no result for {key}"
        assert diffs[key] <= TOLERANCE, f"{key}: max |megatron - transformers| = {diffs[key]:.3e}"


def _assert_same_tensors(original_dir, exported_dir):
    original = load_file(original_dir / "model.safetensors")
    exported = load_file(exported_dir / "model.safetensors")
    assert (original_dir / VALUE_HEAD_FILE).exists() == (exported_dir / VALUE_HEAD_FILE).exists()
    if (original_dir / VALUE_HEAD_FILE).exists():
        original.update(load_file(original_dir / VALUE_HEAD_FILE))
        exported.update(load_file(exported_dir / VALUE_HEAD_FILE))
    # Tied HF models may or may not store lm_head; from_pretrained re-ties it either way.
    original.pop("lm_head.weight", None) if "lm_head.weight" not in exported else None
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), f"{name} differs after the round trip"


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_is_exact(tiny_models, tmp_path, model):
    exported = convert_megatron_to_hf(tiny_models[model]["mg"], tmp_path / "hf")
    _assert_same_tensors(tiny_models[model]["hf"], exported)


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_through_tp2_pp2_load_is_exact(parity_run, tiny_models, tmp_path, model):
    _, resaved_root = parity_run
    exported = convert_megatron_to_hf(resaved_root / model, tmp_path / "hf")
    _assert_same_tensors(tiny_models[model]["hf"], exported)
