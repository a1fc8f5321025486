"""The per-phase memory plan (megatron_save/planning/memory.py) against torch.cuda.max_memory_allocated on a GPU, at
two layouts of one GPU, on SmolLM2-135M's shape (random weights, bf16, local spec, distributed optimizer): TP1 PP1
with nothing offloaded, and TP1 PP1 with ``offload.gradients``, ``offload.optimizer`` and ``offload.reference``.
The measuring is tools/validate_memory_plan.py's ``measure_layout``, the code its CPU run uses
(tests/unit/test_plan_memory.py runs that at a tiny size; docs/perf/memory_plan_validation.txt is its 135M run):
on CUDA each forward's and update's own bytes are the allocator's peak over it less what was allocated when it
began, and each phase's whole peak is ``max_memory_allocated`` over the phase."""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.10
PHASES = ["rollout", "logprobs", "rm_scoring", "rm_update", "policy_update"]


def _validation_tool():
    spec = importlib.util.spec_from_file_location("validate_memory_plan_tool",
                                                  REPO / "tools" / "validate_memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _measure(tool, offloaded: bool):
    gc.collect()
    torch.cuda.empty_cache()
    layout, stage, measured, whole = tool.measure_layout(1, offloaded, "135m", "bf16")
    rows = tool.compare(layout, stage, measured, "135m", whole)
    gc.collect()
    torch.cuda.empty_cache()
    return layout, measured, {row[0]: row for row in rows}


def test_memory_plan_matches_max_memory_allocated_per_phase(world_of_one):
    tool = _validation_tool()
    results = {offloaded: _measure(tool, offloaded) for offloaded in (False, True)}
    for offloaded, (layout, measured, rows) in results.items():
        assert layout.spec == "local" and layout.dtype == "bf16" and layout.offload_optimizer == offloaded
        assert list(rows) == PHASES, list(rows)
        # >= 100M parameters: the policy's bf16 weights alone are over 200 MB.
        assert measured["rollout"]["policy_weights"] >= 100e6 * 2
        for phase, predicted, parts, worst, worst_predicted, worst_got, peak in rows.values():
            print(f"metric memory_plan offload={offloaded} {phase} predicted {predicted / 2**20:.1f} MiB, parts "
                  f"{parts / 2**20:.1f} MiB, max_memory_allocated {peak / 2**20:.1f} MiB; largest part difference "
                  f"{worst} {worst_predicted / 2**20:.1f} / {worst_got / 2**20:.1f} MiB")
            assert peak > 0, phase
            assert abs(predicted - parts) <= TOLERANCE * parts, (offloaded, phase, predicted, parts, worst)
            assert abs(predicted - peak) <= TOLERANCE * peak, (offloaded, phase, predicted, peak)
    # The second layout changes the plan, and the device: offloading frees what sits idle during the rollout.
    kept, offloaded = results[False][2]["rollout"], results[True][2]["rollout"]
    assert offloaded[1] < 0.7 * kept[1] and offloaded[6] < 0.7 * kept[6], (kept, offloaded)
