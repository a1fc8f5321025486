"""The GPU tier tells the truth on machines it cannot see from here: Transformer Engine counts as available only when
it imports (not when importlib finds it), and a GPU test that needs TE is skipped at collection, before any of its
fixtures converts a model, on a GPU machine without TE."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import REPO, TE_FIXTURES, cpu_process_env, tier_skip_reason

from megatron_save.models import spec

# Dumps what collection found (each test's id, markers and fixture closure) to $TIER_PROBE_OUT.
PROBE_PLUGIN = '''
import json, os

def pytest_collection_finish(session):
    with open(os.environ["TIER_PROBE_OUT"], "w") as handle:
        json.dump([{"id": item.nodeid, "markers": sorted({m.name for m in item.iter_markers()}),
                    "fixtures": sorted(item.fixturenames)} for item in session.items], handle)
'''


@pytest.fixture
def fresh_te_check(monkeypatch):
    """transformer_engine_import_error's cached answer forgotten before and after; CUDA reported present."""
    spec.transformer_engine_import_error.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    yield
    spec.transformer_engine_import_error.cache_clear()


@pytest.mark.parametrize("broken", [True, False], ids=["import-fails", "imports"])
def test_transformer_engine_counts_only_when_it_imports(broken, tmp_path, monkeypatch, fresh_te_check):
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libcudnn.so.9: cannot open shared object file')\n"
                                         if broken else "")
    (package / "pytorch.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert importlib.util.find_spec("transformer_engine") is not None  # what the old check asked
    assert spec.transformer_engine_available() is not broken
    if broken:
        assert "libcudnn.so.9" in spec.transformer_engine_missing()
        assert spec.resolve_backend("auto") is spec.SpecBackend.LOCAL
        with pytest.raises(ValueError, match="spec backend 'te': Transformer Engine does not import here "
                                             r"\(ImportError: libcudnn"):
            spec.resolve_backend("te")
    else:
        assert spec.transformer_engine_missing() is None
        assert spec.resolve_backend("auto") is spec.SpecBackend.TRANSFORMER_ENGINE
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        sys.modules.pop(name, None)


def test_tests_needing_transformer_engine_skip_at_collection_on_a_gpu_without_it(tmp_path):
    """The GPU tier's real collection (markers and fixture closures), judged as on a GPU without TE: every TE test
    (all of test_gpu_te_spec.py, the TE kernels) skips, the rest runs; on CPU every GPU test skips."""
    (tmp_path / "tier_probe.py").write_text(PROBE_PLUGIN)
    out = tmp_path / "items.json"
    env = {**cpu_process_env(str(tmp_path)), "TIER_PROBE_OUT": str(out)}
    # A hang guard, not a verdict: collection takes seconds.
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "--collect-only", "-q", "-p", "tier_probe",
                             "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    items = json.loads(out.read_text())
    reasons = {item["id"]: tier_skip_reason(set(item["markers"]), set(item["fixtures"]), cuda=True,
                                            te_missing="Transformer Engine does not import here", vllm_missing=None)
               for item in items}
    skipped = {test for test, reason in reasons.items() if reason}
    te_tests = {test for test in reasons if test.startswith("tests/gpu/test_gpu_te_spec.py::")
                or test.split("::")[-1] in ("test_te_norm_fused_into_linear_qkv_equals_rmsnorm_then_linear",
                                            "test_te_qk_norms_equal_torch_rmsnorm")}
    assert len(te_tests) == 14 and skipped == te_tests, sorted(skipped ^ te_tests)
    assert all("Transformer Engine does not import here" in reasons[test] for test in skipped)
    assert any(test.startswith("tests/gpu/test_gpu_save_cost.py::") for test in reasons.keys() - skipped)
    assert all(tier_skip_reason(set(item["markers"]), set(item["fixtures"]), cuda=False, te_missing=None,
                                vllm_missing=None) == "needs a CUDA GPU (the GPU tier)" for item in items)
    assert TE_FIXTURES >= {"te"}


def _gpu_acceptance():
    module_spec = importlib.util.spec_from_file_location("gpu_acceptance_tool", REPO / "tools" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # its dataclasses look their module up
    module_spec.loader.exec_module(module)
    return module


def test_the_gpu_tier_estimates_itself_within_its_budget():
    """Every file with tests marked ``gpu`` has its H100 estimate in tools/gpu_acceptance.py, and their sum fits
    the tier's 8 minutes. (The acceptance report puts the measured time beside it.)"""
    acceptance = _gpu_acceptance()
    marked = {path.relative_to(REPO).as_posix() for path in (REPO / "tests").rglob("test_*.py")
              if re.search(r"^(pytestmark = |@)pytest\.mark\.gpu\b", path.read_text(), flags=re.MULTILINE)}
    assert set(acceptance.GPU_TIER_ESTIMATE_S) == marked, set(acceptance.GPU_TIER_ESTIMATE_S) ^ marked
    assert acceptance.gpu_tier_estimate_s() <= acceptance.TIER_BUDGET_S == 8 * 60
    outcome = acceptance.Outcome(acceptance.GPU_TIER, "ok", 301.0)
    report = acceptance.report_markdown({}, [outcome], 480, 400, 480)
    assert f"own estimate on one H100: {acceptance.gpu_tier_estimate_s():.0f} s of its 480 s budget; measured " \
           "here: 301 s." in report


def test_without_time_limits_a_slow_section_is_not_failed(tmp_path):
    """On CPU the acceptance sets no budget: a section that outlives its limit (a loaded machine) still passes, and
    only a hang guard of ten times the limit (here 60 s) stops it."""
    acceptance = _gpu_acceptance()
    slow = acceptance.Section("slow", [sys.executable, "-c", "import time; time.sleep(7)"], timeout_s=6.0)
    assert acceptance.run_section(slow, tmp_path / "a.log", seconds_left=0.5, time_limits=False).status == "ok"
    limited = acceptance.run_section(slow, tmp_path / "b.log", seconds_left=100, time_limits=True)
    assert limited.status == "timed out after 6 s"
    assert acceptance.run_section(slow, tmp_path / "c.log", seconds_left=1, time_limits=True).status == \
        "skipped: the time budget is spent"
