"""GPU acceptance: the first thing to run on a fresh GPU machine; writes its findings to docs/gpu/REPORT.md.

    bash examples/gpu/acceptance.sh [WORK_DIR] [REPORT]      (default outputs/gpu_acceptance, docs/gpu/REPORT.md)
    python tools/gpu_acceptance.py --work DIR --report FILE [--tier-budget-s 480] [--budget-s 480]
                                   [--scales tiny 0.5b] [--quick] [--no-time-limits]

First the GPU test tier, ``python -m pytest -m gpu tests`` (tests/gpu and every test marked ``gpu``: TE spec parity
and a bf16 training step, weight sync from a TE-spec model, the fused SwiGLU and TE norms, CUDA RNG in run
checkpoints, distributed-optimizer resume, offload moving real tensors, the memory plan per phase against
max_memory_allocated, the SAVE step against GRPO) within its own
budget (8 minutes by default, 0 leaves it out); its pass / fail / skip lines and the measurements its tests print
go into the report. Then sections, each a child process with its own time limit inside the sections' budget (8
minutes by default), so one failure or hang does not hide the rest: the environment (torch, CUDA, Transformer
Engine, vLLM); tiny and
Qwen2.5-0.5B-shaped random models converted to bf16; Megatron against transformers logits through the local spec
and, when Transformer Engine is importable, through the TE spec (both against the same fp32 reference, so their
figures side by side are the TE vs local parity); stage 1 and stage 2 in bf16 on the tiny RM; stage 3 through
tools/bench_stage3.py (GRPO against SAVE: per-phase time, passes and peak memory per phase) at each scale, with the
memory planner's per-GPU bound for the same run beside it; a stage-3 run with vLLM rollouts when vLLM is
importable; the streamed export on 2 processes; a tiny Qwen3-MoE reward model against transformers, and with 2 GPUs
sequence parallelism at TP=2 (dense and MoE parity, a MoE stage-1 run). A section that cannot run here is listed as
skipped with the reason. Without CUDA it runs the same path on CPU processes (tiny scale only; the test tier then
reports each GPU test skipped with its reason): that is what the tests start. The exit status is 1 when the tier or
a section failed or timed out.

The tier's own estimate on one H100 is the sum of GPU_TIER_ESTIMATE_S (per test file; the report puts the measured
time beside it), at most the tier's 8-minute budget (tests/unit/test_gpu_tier.py checks both). Time budgets are a GPU
run's concern: without CUDA, or with --no-time-limits, no budget applies and each limit becomes a hang guard ten
times as long, so a slow or busy machine is reported slow, not failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_save.models.spec import transformer_engine_import_error, transformer_engine_missing

REPO = Path(__file__).resolve().parent.parent
# Output lines a section's report keeps (the rest stays in its log): parity verdicts, the bench's table and ratios,
# the test tier's outcomes and summary.
KEPT_LINES = re.compile(r"(OK|MISMATCH)$|^(time|memory|passes)/|^metric |^hooked rows|SAVE / GRPO|wrote|"
                        r"held-out accuracy|"
                        r"after \d+ steps|Traceback|Error|^per GPU|^\s+total\s|^peak: |"
                        r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) |^(=+ )?\d+ (passed|failed|skipped|errors?)\b")
GPU_TIER = "GPU test tier (python -m pytest -m gpu tests)"
TIER_BUDGET_S = 480.0
"""The GPU test tier's wall-clock budget on one H100 (8 minutes), and the default of --tier-budget-s."""
GPU_TIER_ESTIMATE_S = {
    # Tiny models: compute is negligible, and each item is start-up (CUDA context, Transformer Engine import),
    # in-process conversions and model builds. The session's conversions (tests/conftest.py tiny_models, 7 models,
    # and tiny_moe_models, 2) count once, with the first file that takes them (pytest runs files in name order).
    "tests/gpu/test_gpu_checkpoints.py": 70.0,  # tiny_models' conversions; RNG round trip, 7 optimizer steps
    "tests/gpu/test_gpu_kernels.py": 30.0,  # 4 tests: kernel calls on random tensors, one tiny model through both paths
    "tests/gpu/test_gpu_memory_plan.py": 45.0,  # 1 test: two layouts of 135M-parameter policy, reference, RM, engine
    "tests/gpu/test_gpu_offload.py": 25.0,  # 1 test: one tiny model's weights and states moved out and back
    "tests/gpu/test_gpu_save_cost.py": 180.0,  # 2 stage-3 launches (torchrun, 3 steps each) and the hooked step
    "tests/gpu/test_gpu_te_spec.py": 120.0,  # tiny_moe_models' conversions; 12 tests: 7 parity reports, SFT x2
    "tests/unit/test_cpu_compat.py": 5.0,  # 1 test: the compat module refuses to install with CUDA present
}
"""Estimated seconds on one H100 of each file's tests marked ``gpu`` (with its share of pytest's start-up)."""
HANG_GUARD_FACTOR = 10
"""Without time limits, how many times a section's limit it may run before it counts as hung."""


@dataclass
class Section:
    """One check: a command, its time limit, or the reason it cannot run on this machine."""

    name: str
    command: list[str]
    timeout_s: float
    skip_reason: str | None = None


@dataclass
class Outcome:
    """What a section gave: ok, FAILED (exit N), timed out or skipped (reason); wall time; the lines kept."""

    name: str
    status: str
    wall_s: float = 0.0
    lines: list[str] = field(default_factory=list)


def torchrun(*args: str, nproc: int = 1) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def importable(module: str) -> bool:
    """Whether ``module`` can be found (a missing parent package counts as not importable)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def environment() -> dict[str, str]:
    """Versions and which optional GPU extras are importable."""
    cuda = torch.cuda.is_available()
    found = {name: importable(module) for name, module in (("vLLM", "vllm"), ("NVIDIA Apex", "apex.normalization"))}
    te_error = transformer_engine_import_error()
    return {"torch": torch.__version__, "CUDA": torch.version.cuda if cuda else "not available",
            "device": torch.cuda.get_device_name(0) if cuda else "CPU (gloo processes)",
            "Transformer Engine": "imports" if te_error is None else f"does not import ({te_error})",
            **{name: "importable" if ok else "not importable" for name, ok in found.items()}}


def gpu_tier_section(budget_s: float) -> Section:
    """The tests marked ``gpu``; -rfEsP lists every failure, error and skip (with its reason) and the printed
    output of the passing tests (their measurements)."""
    return Section(GPU_TIER, [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-q",
                              "-rfEsP"], budget_s)


def sections(work: Path, scales: list[str], quick: bool) -> list[Section]:
    """Every check in order; later ones read what earlier ones wrote under ``work``."""
    cuda = torch.cuda.is_available()
    te = transformer_engine_missing()
    vllm = None if cuda and importable("vllm") else "vLLM needs CUDA and the vllm package: not " \
        "importable here"
    py, data = sys.executable, work / "data"
    steps = ["--steps", "2", "--rounds", "1"] if quick else ["--steps", "3", "--rounds", "1"]
    out = [Section("synthetic data", [py, "tools/make_synthetic_data.py", "--out", str(data), "--prompts", "64"], 60)]
    for scale in scales:
        model = work / scale
        out += [
            Section(f"{scale}: random policy and RM (HF)", ["bash", "-c", " && ".join([
                f"{py} tools/make_tiny_model.py --family qwen2 --scale {scale} --out {model}/hf_policy --seed 1",
                f"{py} tools/make_tiny_model.py --family qwen2 --scale {scale} --reward-model --out {model}/hf_rm "
                "--seed 2"])], 180),
            Section(f"{scale}: convert to bf16 Megatron", ["bash", "-c", " && ".join([
                f"{py} tools/convert_hf_to_megatron.py --hf-dir {model}/hf_policy --out {model}/policy --dtype bf16",
                f"{py} tools/convert_hf_to_megatron.py --hf-dir {model}/hf_rm --out {model}/rm --dtype bf16",
                f"{py} tools/convert_hf_to_megatron.py --hf-dir {model}/hf_rm --out {model}/rm_value --dtype bf16 "
                "--add-value-head"])], 240),
        ]
        # A bf16 reward is a few cancelling terms: transformers' own bf16 forward is 2.3e-2 (relative) off its
        # fp32 one on the tiny RM, above check_parity's bf16 default of 2e-2; the RM is checked at 5e-2.
        for spec, reason in (("local", None), ("te", te)):
            out += [Section(f"{scale}: parity vs transformers, {spec} spec, {role}",
                            torchrun("tools/check_parity.py", "--ckpt", str(model / ckpt), "--hf-dir",
                                     str(model / hf), "--spec", spec, *rtol), 120, reason)
                    for role, ckpt, hf, rtol in (("policy", "policy", "hf_policy", []),
                                                 ("RM", "rm", "hf_rm", ["--rtol", "5e-2"]))]
    tiny = work / scales[0]
    out.append(Section(f"{scales[0]}: streamed export to HF on 2 processes", torchrun(
        "tools/convert_megatron_to_hf.py", "--ckpt", str(tiny / "rm_value"), "--out", str(work / "exported_rm"),
        nproc=2), 120))
    out += moe_and_sequence_parallel_sections(work, tiny, te)
    out += [
        Section(f"{scales[0]}: stage 1 (BT) in bf16", torchrun(
            "-m", "megatron_save", "stage1", "examples/cpu/stage1_bt.yaml", f"checkpoint={tiny / 'rm'}",
            f"output_dir={work / 'stage1'}", f"data.train_data={data / 'preference_train.jsonl'}",
            f"data.eval_data={data / 'preference_eval.jsonl'}", "parallel.tensor_model_parallel_size=1"), 240),
        Section(f"{scales[0]}: stage 2 (value head) in bf16", torchrun(
            "-m", "megatron_save", "stage2", "examples/cpu/stage2_value.yaml", f"checkpoint={work / 'stage1'}",
            f"output_dir={work / 'stage2'}", f"data.train_data={data / 'responses.jsonl'}", "batch.epochs=1",
            "parallel.pipeline_model_parallel_size=1"), 240),
    ]
    for scale in scales:
        out.append(Section(f"{scale}: stage 3, GRPO vs SAVE (tools/bench_stage3.py)", [
            py, "tools/bench_stage3.py", "--config", "examples/cpu/stage3_save.yaml", "--nproc", "1", *steps,
            "--policy", str(work / scale / "policy"), "--reward", str(work / scale / "rm_value"), "--prompts",
            str(data / "prompts.jsonl"), "parallel.tensor_model_parallel_size=1"], 300))
        # The planner's bound for that run (examples/cpu/stage3_save.yaml's sizes: 4 prompts x G = 4, 64 + 12
        # tokens, policy micro-batch 4, one prompt's 4 responses per RM micro-batch), beside the measured peaks.
        out.append(Section(f"{scale}: the planner's per-GPU bytes for that run", [
            py, "tools/plan_memory.py", "--policy", str(work / scale / "hf_policy"), "--reward",
            str(work / scale / "hf_rm"), "--dtype", "bf16", "--micro-batch", "4", "--reward-micro-batch", "4",
            "--prompt-length", "64", "--response-length", "12", "--rollout-batch", "16", "--value-head", "--spec",
            "local" if te else "te"], 60))
    out.append(Section(f"{scales[0]}: stage 3 with vLLM rollouts", torchrun(
        "-m", "megatron_save", "stage3", "examples/cpu/stage3_save.yaml", f"output_dir={work / 'stage3_vllm'}",
        f"policy.checkpoint={tiny / 'policy'}", f"reward.checkpoint={tiny / 'rm_value'}",
        f"train_data={data / 'prompts.jsonl'}", "total_steps=2", "save_every=0", "tensorboard=false",
        "parallel.tensor_model_parallel_size=1", "rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=1",
        "rollout.vllm.gpu_memory_utilization=0.2"), 240, vllm))
    return out


def moe_and_sequence_parallel_sections(work: Path, tiny: Path, te_missing: str | None) -> list[Section]:
    """A tiny Qwen3-MoE reward model against transformers (on a GPU through the TE spec: megatron-core 0.16.1's MoE
    router needs it), and sequence parallelism at TP=2, which megatron-core's local spec cannot build: a dense
    policy's and the MoE RM's parity and a MoE stage-1 run (MoE training at TP > 1 needs SP)."""
    cuda = torch.cuda.is_available()
    py, moe, data = sys.executable, work / "moe", work / "data"
    if not cuda:
        sp_missing = ("sequence parallelism needs the Transformer Engine spec on 2 or more GPUs (the local spec's "
                      "torch norms refuse it)")
    elif torch.cuda.device_count() < 2:
        sp_missing = f"sequence parallelism at TP=2 needs 2 GPUs, {torch.cuda.device_count()} here"
    else:
        sp_missing = te_missing
    spec = ["--spec", "te"] if cuda else ["--spec", "local"]
    # fp32 weights: a wrong route or expert shows as an O(1) difference; 1e-2 leaves room for TF32 GEMMs.
    parity = ["tools/check_parity.py", "--ckpt", str(moe / "rm"), "--hf-dir", str(moe / "hf_rm"), "--rtol", "1e-2"]
    return [
        Section("tiny MoE: random RM (HF) and conversion", ["bash", "-c", " && ".join([
            f"{py} tools/make_tiny_model.py --family qwen3_moe --reward-model --value-head --out {moe}/hf_rm --seed 3",
            f"{py} tools/convert_hf_to_megatron.py --hf-dir {moe}/hf_rm --out {moe}/rm"])], 180),
        Section("tiny MoE: parity vs transformers, RM", torchrun(*parity, *spec), 120, te_missing if cuda else None),
        Section("sequence parallelism: parity at TP=2, policy", torchrun(
            "tools/check_parity.py", "--ckpt", str(tiny / "policy"), "--hf-dir", str(tiny / "hf_policy"), "--tp", "2",
            "--sequence-parallel", "--spec", "te", nproc=2), 120, sp_missing),
        Section("sequence parallelism: MoE RM parity at TP=2", torchrun(
            *parity, "--tp", "2", "--sequence-parallel", "--spec", "te", nproc=2), 120, sp_missing),
        Section("sequence parallelism: MoE stage 1 at TP=2", torchrun(
            "-m", "megatron_save", "stage1", "examples/cpu/stage1_bt.yaml", f"checkpoint={moe / 'rm'}",
            f"output_dir={work / 'stage1_moe_sp'}", f"data.train_data={data / 'preference_train.jsonl'}",
            f"data.eval_data={data / 'preference_eval.jsonl'}", "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true", nproc=2), 240, sp_missing),
    ]


def gpu_tier_estimate_s() -> float:
    """The GPU test tier's estimated wall time on one H100: the sum of GPU_TIER_ESTIMATE_S."""
    return sum(GPU_TIER_ESTIMATE_S.values())


def run_section(section: Section, log: Path, seconds_left: float, time_limits: bool = True) -> Outcome:
    """Runs one section into ``log`` within its limit and what is left of the budget; without ``time_limits``,
    within HANG_GUARD_FACTOR times its limit and no budget (a slow machine is not a failing one)."""
    if section.skip_reason:
        return Outcome(section.name, f"skipped: {section.skip_reason}")
    limit = min(section.timeout_s, seconds_left) if time_limits else section.timeout_s * HANG_GUARD_FACTOR
    if limit < 5:
        return Outcome(section.name, "skipped: the time budget is spent")
    start = time.monotonic()
    with open(log, "w") as handle:
        try:
            result = subprocess.run(section.command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                    timeout=limit)
            status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s" + ("" if time_limits else " (hang guard)")
    text = log.read_text(errors="replace").splitlines()
    kept = [line for line in text if KEPT_LINES.search(line)]
    if status != "ok":
        kept += ["--- last lines ---", *text[-15:]]
    return Outcome(section.name, status, time.monotonic() - start, kept)


def run_numbered(section: Section, index: int, total: int, work: Path, seconds_left: float,
                 time_limits: bool = True) -> Outcome:
    """run_section with its progress printed and its log under ``work``/logs, numbered in the order of the run."""
    print(f"[{index}/{total}] {section.name}", flush=True)
    log = work / "logs" / f"{index:02d}_{re.sub(r'[^a-z0-9]+', '_', section.name.lower()).strip('_')}.log"
    outcome = run_section(section, log, seconds_left, time_limits)
    print(f"    {outcome.status} ({outcome.wall_s:.1f} s)", flush=True)
    return outcome


def git_revision() -> str:
    result = subprocess.run(["git", "log", "--oneline", "-1"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or "unknown (not a git checkout)"


def report_markdown(env: dict[str, str], outcomes: list[Outcome], budget_s: float, wall_s: float,
                    tier_budget_s: float = 0.0, time_limits: bool = True) -> str:
    tier = f"the test tier's {tier_budget_s:.0f} s and " if tier_budget_s > 0 else ""
    budgets = (f"in {wall_s:.0f} s of {tier}a {budget_s:.0f} s budget for the sections" if time_limits else
               f"in {wall_s:.0f} s, with no time budget (hang guards of {HANG_GUARD_FACTOR}x each limit only)")
    measured = next((o.wall_s for o in outcomes if o.name == GPU_TIER and o.status == "ok"), None)
    estimate = (f"The GPU test tier's own estimate on one H100: {gpu_tier_estimate_s():.0f} s of its "
                f"{TIER_BUDGET_S:.0f} s budget" + (f"; measured here: {measured:.0f} s." if measured else "."))
    lines = ["# GPU acceptance report", "",
             f"Written by `examples/gpu/acceptance.sh` ({Path(__file__).name}) on "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC at revision `{git_revision()}`, "
             f"{budgets}.", "", estimate, "",
             *[f"- {name}: {value}" for name, value in env.items()], "",
             "| section | result | wall s |", "|---|---|---|",
             *[f"| {o.name} | {o.status} | {o.wall_s:.1f} |" for o in outcomes], ""]
    for outcome in outcomes:
        if outcome.lines:
            lines += [f"## {outcome.name}", "", "```", *outcome.lines, "```", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/gpu_acceptance", help="scratch directory (emptied first)")
    parser.add_argument("--report", default="docs/gpu/REPORT.md", help="the markdown report to write")
    parser.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of all sections")
    parser.add_argument("--tier-budget-s", type=float, default=TIER_BUDGET_S,
                        help="wall-clock limit of the GPU test tier, run first (0 leaves it out)")
    parser.add_argument("--no-time-limits", action="store_true",
                        help="no budget, and each limit a hang guard of 10x (the default without CUDA: a CPU "
                             "machine's speed must not decide the outcome)")
    parser.add_argument("--scales", nargs="+", default=None,
                        help="model scales (default: tiny and 0.5b with CUDA, tiny without)")
    parser.add_argument("--quick", action="store_true", help="the bench with one measured step")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    scales = args.scales or (["tiny", "0.5b"] if torch.cuda.is_available() else ["tiny"])
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    begin, outcomes = time.monotonic(), []
    time_limits = torch.cuda.is_available() and not args.no_time_limits
    tier = [gpu_tier_section(args.tier_budget_s)] if args.tier_budget_s > 0 else []
    todo = sections(work, scales, args.quick)
    total = len(tier) + len(todo)
    for section in tier:
        outcomes.append(run_numbered(section, len(outcomes) + 1, total, work, args.tier_budget_s, time_limits))
    start = time.monotonic()  # the sections' budget starts after the tier
    for section in todo:
        outcomes.append(run_numbered(section, len(outcomes) + 1, total, work,
                                     args.budget_s - (time.monotonic() - start), time_limits))
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(report_markdown(environment(), outcomes, args.budget_s, time.monotonic() - begin,
                                      args.tier_budget_s if tier else 0.0, time_limits))
    print(f"report: {report} (logs: {work / 'logs'})")
    failed = [o.name for o in outcomes if o.status.startswith(("FAILED", "timed out"))]
    if failed:
        raise SystemExit(f"gpu_acceptance: {len(failed)} section(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
