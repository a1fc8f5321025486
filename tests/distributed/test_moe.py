"""Qwen3-MoE: Megatron (routed experts, Megatron-Core's MoE layer) == transformers after conversion at EP=2,
TP=2 x EP=2, TP=2 with expert TP=2 (with and without EP=2), PP=2 and PP=2 x EP=2 (4 gloo processes); every expert's HF tensor gathered back at each layout;
conversion round trips bit-exact, also through a TP=2 x EP=2 sharded load.
"""

from __future__ import annotations

import json

import pytest
from helpers import MOE_LAYOUTS, read_json, torchrun

from megatron_save.checkpoint.convert import convert_megatron_to_hf
from test_parity import _assert_same_tensors

TOLERANCE = 1e-4
MODELS = ["qwen3_moe-lm", "qwen3_moe-rmv"]


@pytest.fixture(scope="module")
def moe_run(tiny_moe_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    models_file = root / "models.json"
    models_file.write_text(json.dumps({n: {k: str(v) for k, v in d.items()} for n, d in tiny_moe_models.items()}))
    torchrun("parity_worker.py", 4, "--moe", "--models", str(models_file), "--out", str(root / "diffs.json"),
             "--resave-layout", "tp2ep2", "--resave-root", str(root / "resaved"))
    return read_json(root / "diffs.json"), root / "resaved"


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_megatron_matches_transformers(moe_run, model, layout):
    diffs, _ = moe_run
    stats = ["", "/gather"] + (["/logp", "/entropy"] if model.endswith("-lm") else [])
    for stat in stats:
        key = f"{model}/{layout}{stat}"
        assert key in diffs, f"no result for {key}"
        assert diffs[key] <= TOLERANCE, f"{key}: max |megatron - transformers| = {diffs[key]:.3e}"


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_is_exact(tiny_moe_models, tmp_path, model):
    exported = convert_megatron_to_hf(tiny_moe_models[model]["mg"], tmp_path / "hf")
    _assert_same_tensors(tiny_moe_models[model]["hf"], exported)


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_through_tp2_ep2_load_is_exact(moe_run, tiny_moe_models, tmp_path, model):
    _, resaved_root = moe_run
    exported = convert_megatron_to_hf(resaved_root / model, tmp_path / "hf")
    _assert_same_tensors(tiny_moe_models[model]["hf"], exported)
