"""examples/gpu/acceptance.sh (tools/gpu_acceptance.py) on CPU: the GPU acceptance path with its CPU fallback (tiny scale, gloo processes),
the report it writes, and the sections that say why they cannot run here."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, cpu_process_env

# The CPU path, on a GPU machine too (there the GPU path is the acceptance run itself).
ENV = cpu_process_env()


def test_acceptance_runs_on_cpu_and_writes_the_report(tmp_path):
    """No wall-clock budget decides this on CPU (--no-time-limits, also the default without CUDA): under load the
    inherited 8-minute budget for the sections once left the last of them 11 s. The launch's limit is a hang guard,
    about ten times the sections' time on a quiet machine."""
    work, report = tmp_path / "work", tmp_path / "REPORT.md"
    result = subprocess.run(["bash", "examples/gpu/acceptance.sh", str(work), str(report), "--quick",
                             "--no-time-limits"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert "with no time budget (hang guards of 10x each limit only)" in text, text
    assert re.search(r"^The GPU test tier's own estimate on one H100: \d+ s of its 480 s budget; measured here",
                     text, flags=re.MULTILINE), text
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \| [\d.]+ \|$", text, flags=re.MULTILINE))
    for section in ("synthetic data", "tiny: convert to bf16 Megatron", "tiny: parity vs transformers, local spec, "
                    "policy", "tiny: parity vs transformers, local spec, RM", "tiny: stage 1 (BT) in bf16",
                    "tiny: stage 2 (value head) in bf16", "tiny: stage 3, GRPO vs SAVE (tools/bench_stage3.py)",
                    "tiny MoE: random RM (HF) and conversion", "tiny MoE: parity vs transformers, RM",
                    "tiny: the planner's per-GPU bytes for that run",
                    "tiny: streamed export to HF on 2 processes"):
        assert rows.get(section) == "ok", (section, text)
    # The GPU test tier runs first: collected, every test skipped with the reason.
    assert rows["GPU test tier (python -m pytest -m gpu tests)"] == "ok", text
    assert list(rows)[0] == "GPU test tier (python -m pytest -m gpu tests)"
    assert re.search(r"^SKIPPED \[\d+\] tests/gpu/test_gpu_te_spec\.py.*: needs a CUDA GPU", text, flags=re.MULTILINE)
    assert re.search(r"^(=+ )?\d+ skipped, \d+ deselected in ", text, flags=re.MULTILINE), text
    assert rows["tiny: parity vs transformers, te spec, policy"].startswith("skipped: Transformer Engine needs CUDA")
    assert rows["tiny: stage 3 with vLLM rollouts"].startswith("skipped: vLLM needs CUDA")
    for section in ("parity at TP=2, policy", "MoE RM parity at TP=2", "MoE stage 1 at TP=2"):
        assert rows[f"sequence parallelism: {section}"].startswith("skipped: sequence parallelism needs the "
                                                                    "Transformer Engine spec on 2 or more GPUs")
    assert "CUDA: not available" in text and "0.5b" not in text  # the 0.5B scale is a GPU item
    assert re.search(r"local spec, \d+ sequences .*: OK$", text, flags=re.MULTILINE), text
    assert re.search(r"^passes/reward_forward\s+1\.0000\s+2\.0000", text, flags=re.MULTILINE), text
    assert "step time: SAVE / GRPO" in text and "held-out accuracy after" in text
    # The planner's per-phase table: its total row and the peak phase.
    assert re.search(r"^\s+total(\s+[\d.]+){6}$", text, flags=re.MULTILINE), text
    assert re.search(r"^peak: \w+, [\d.]+ GiB$", text, flags=re.MULTILINE), text


def test_check_parity_refuses_the_te_spec_without_cuda(tmp_path):
    subprocess.run([sys.executable, "tools/make_tiny_model.py", "--out", str(tmp_path / "hf")], cwd=REPO, env=ENV,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out",
                    str(tmp_path / "mg")], cwd=REPO, env=ENV, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                             "tools/check_parity.py", "--ckpt", str(tmp_path / "mg"), "--hf-dir", str(tmp_path / "hf"),
                             "--spec", "te"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    assert result.returncode != 0 and "--spec te" in result.stderr and "needs CUDA" in result.stderr, result.stderr
