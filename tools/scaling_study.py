"""A scaling study as one command: a study file lists backbones; each is planned, run and measured, and the
results come back as one table and plots against model size.

    python tools/scaling_study.py plan STUDY.yaml [key=value ...]
    python tools/scaling_study.py run STUDY.yaml [--wait] [key=value ...]
    python tools/scaling_study.py collect STUDY.yaml [key=value ...]
    python tools/scaling_study.py make-backbone --out DIR (--hf MODEL | --family F --set KEY=N ...) [--value-head]

The study file is megatron_save/planning/study.py's StudyConfig (backbones, recipe, cluster, run_shape,
launcher); examples/scaling/study_qwen3.yaml is one for a cluster, tests/e2e/test_scaling_study.py runs tiny ones.

plan: per backbone its parameters (total and active), the layout and memory settings that fit cluster.memory_per_gpu
  (the memory planner's per-GPU bytes, tried from the plainest settings up), and every job's exact commands.
  Writes OUTPUT_DIR/plan.json.
run: local runs the jobs one after another on this machine; slurm writes one sbatch script per job under
  OUTPUT_DIR/scripts (prepare -> rm -> each cell, chained with --dependency=afterok), submits them when sbatch is on
  PATH and prints the job ids (without sbatch it writes the scripts and says so). A job whose DONE marker exists is
  skipped, so a repeated run continues a study; a Slurm job still queued or running from an earlier run is waited
  on, not submitted again. --wait (slurm) returns once every submitted job has ended; the exit status is 1 when a
  job failed (local: when any job failed).
make-backbone: what a prepare job runs, in one process: DIR/hf (a random model of the shape, with the tiny
  character tokenizer), then DIR/policy and DIR/reward_init (--as-reward-model; --value-head adds a zero value
  head), as tools/make_tiny_model.py and tools/convert_hf_to_megatron.py would.
collect: OUTPUT_DIR/results.md, results.json (with provenance) and plots/<metric>.png against the parameter count:
  one row per cell, a failed or missing cell shown as such.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from megatron_save.planning import MemoryLayout, architecture_from_hf, candidate_layouts, parse_bytes, plan_memory
from megatron_save.planning.memory import (STAGE3_SETTINGS, MemoryPlan, Recompute, changed_settings, search_fits,
                                          stage_params)
from megatron_save.planning.study import (DONE, BackbonePaths, Job, Layout, StudyConfig, backbone_paths, cells_of,
                                          jobs_of, load_study, sbatch_script, step_command)
from megatron_save.trainers.strategies import strategy_named
from megatron_save.utils.provenance import current_provenance

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
FAILED = "FAILED"


# ---------------------------------------------------------------- planning


@dataclass
class Fit:
    """What the memory planner gives a backbone: the layout, its per-GPU bytes for each strategy, and whether the
    largest fits."""

    layout: Layout
    planned_bytes: dict[str, int]
    capacity: int
    fits: bool


def trains_reward_model(strategy: str) -> bool:
    """Whether stage 3 with ``reward.strategy=strategy`` trains the reward model (and writes run/reward_model)."""
    return strategy_named(strategy).trains_backbone


def fit_layout(policy, reward, gpus: int, capacity: int, study: StudyConfig) -> Fit:
    """The one call into the memory planner: the cheapest settings of ``gpus`` GPUs whose per-GPU peak (the
    fullest phase, megatron_save/planning/memory.py) fits ``capacity`` for every strategy: the planner's search
    over layouts, recompute, token budgets and offload (``search_fits``, cheapest in step time first), without
    and then with the distributed optimizer. When none fits, the layout with every memory setting on that needs
    least, marked."""
    shape = study.run_shape
    base = MemoryLayout(dtype=shape.dtype, spec=shape.spec, fused_activation=shape.spec == "te",
                        micro_batch=shape.micro_batch, reward_micro_batch=shape.reward_micro_batch,
                        prompt_length=shape.prompt_length, response_length=shape.response_length,
                        rollout_batch=shape.rollout_batch, value_head=True)
    trained = {s: trains_reward_model(s) for s in study.recipe.strategies}

    def peaks(layout: MemoryLayout) -> dict[str, int]:
        return {s: plan_memory(policy, reward, replace(layout, reward_trained=t)).peak for s, t in trained.items()}

    def plan_of(layout: MemoryLayout) -> MemoryPlan:
        # The search reads one plan a variant: the strategy that needs most.
        return max((plan_memory(policy, reward, replace(layout, reward_trained=t)) for t in set(trained.values())),
                   key=lambda plan: plan.peak)

    least = None
    for distributed in (False, True):
        start = replace(base, distributed_optimizer=distributed)
        layouts = candidate_layouts(policy, reward, gpus, start)
        if not layouts:
            raise SystemExit(f"scaling_study: no TP x PP layout of {gpus} GPUs splits {policy.source}")
        fits = search_fits(plan_of, layouts, capacity)
        if fits:
            return _fit(start, fits[0].layout, peaks(fits[0].layout), capacity)
        for layout in layouts:
            squeezed = replace(layout, policy_recompute=Recompute("full"), reward_recompute=Recompute("full"),
                               max_tokens_per_micro_batch=layout.sequence,
                               reward_max_tokens_per_micro_batch=layout.sequence, offload_optimizer=True,
                               offload_gradients=True, offload_reference=True)
            try:
                planned = peaks(squeezed)
            except ValueError:
                continue
            if least is None or max(planned.values()) < max(least.planned_bytes.values()):
                least = _fit(start, squeezed, planned, capacity)
    if least is None:
        raise SystemExit(f"scaling_study: the planner splits no layout of {gpus} GPUs for {policy.source}")
    return least


# The stage-3 settings the search may change besides the parallel layout (Layout carries TP, PP and EP itself).
MEMORY_SETTINGS = {name: setting for name, setting in STAGE3_SETTINGS.items() if name not in ("tp", "pp", "ep")}


def _fit(base: MemoryLayout, layout: MemoryLayout, planned: dict[str, int], capacity: int) -> Fit:
    settings = changed_settings(base, layout, MEMORY_SETTINGS)
    return Fit(Layout(tp=layout.tp, pp=layout.pp, ep=layout.ep, distributed_optimizer=layout.distributed_optimizer,
                      stage3=settings), planned, capacity, max(planned.values()) <= capacity)


def backbone_config(backbone):
    """The transformers config of a backbone (its HF config.json, or the tiny shape's)."""
    if backbone.shape is not None:
        from megatron_save.testing import tiny_hf_config

        return tiny_hf_config(backbone.family, **backbone.shape)
    from transformers import AutoConfig

    from megatron_save.checkpoint.convert import resolve_hf_dir

    return AutoConfig.from_pretrained(backbone.config or resolve_hf_dir(backbone.hf))


def parameter_counts(arch) -> tuple[int, int]:
    """(total, active per token) parameters of a causal LM."""
    params = stage_params(arch, 1, 1, 0)
    expert = sum(params.expert)
    active = params.total() - expert + (expert * arch.experts_per_token // arch.num_experts if expert else 0)
    return params.total(), active


def plan_study(study: StudyConfig) -> dict:
    """Per backbone: parameters, the layout that fits and its planned bytes."""
    cluster = study.cluster
    gpus, capacity = cluster.nodes * cluster.gpus_per_node, parse_bytes(cluster.memory_per_gpu)
    plan = {}
    for backbone in study.backbones:
        config = backbone_config(backbone)
        policy = architecture_from_hf(config, reward_model=False, source=backbone.name)
        reward = architecture_from_hf(config, reward_model=True, source=backbone.name)
        fit = fit_layout(policy, reward, gpus, capacity, study)
        total, active = parameter_counts(policy)
        plan[backbone.name] = {"params_total": total, "params_active": active, "gpus": gpus,
                               "layout": asdict(fit.layout), "dp": gpus // (fit.layout.tp * fit.layout.pp),
                               "planned_gib": {s: b / GIB for s, b in fit.planned_bytes.items()},
                               "capacity_gib": capacity / GIB, "fits": fit.fits}
    return plan


def layouts_of(plan: dict) -> dict[str, Layout]:
    return {name: Layout(**entry["layout"]) for name, entry in plan.items()}


def absolute(study: StudyConfig) -> StudyConfig:
    """The study with its output directory and the files it names made absolute (scripts run from the repo)."""
    def resolve(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path

    study.output_dir = str(Path(study.output_dir).resolve())
    recipe = study.recipe
    for name in ("preference_train", "preference_eval", "value_data", "prompts", "benchmark_data"):
        setattr(recipe, name, resolve(getattr(recipe, name)))
    for name in ("stage1_configs", "stage2_configs", "stage3_configs"):
        setattr(recipe, name, [resolve(p) for p in getattr(recipe, name)])
    for backbone in study.backbones:
        backbone.hf, backbone.config = resolve(backbone.hf), resolve(backbone.config)
    return study


def command_plan(study: StudyConfig) -> tuple[dict, list[Job]]:
    plan = plan_study(study)
    jobs = jobs_of(study, layouts_of(plan), trains_reward_model)
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    slurm = study.launcher == "slurm"
    (out / "plan.json").write_text(json.dumps(
        {"backbones": plan, "jobs": [{"name": j.name, "after": j.after,
                                      "commands": [step_command(study, s, slurm) for s in j.steps]}
                                     for j in jobs]}, indent=1) + "\n")
    return plan, jobs


def print_plan(study: StudyConfig, plan: dict, jobs: list[Job]) -> None:
    slurm = study.launcher == "slurm"
    for name, entry in plan.items():
        layout = entry["layout"]
        settings = [k for k, v in layout.items() if v is True]
        planned = ", ".join(f"{s} {g:.2f}" for s, g in entry["planned_gib"].items())
        fits = "fits" if entry["fits"] else "DOES NOT FIT"
        print(f"{name}: {entry['params_total'] / 1e6:.1f}M params ({entry['params_active'] / 1e6:.1f}M active), "
              f"{entry['gpus']} GPUs as TP {layout['tp']} x PP {layout['pp']} x DP {entry['dp']}"
              f"{' (EP ' + str(layout['ep']) + ')' if layout['ep'] > 1 else ''}"
              f"{' + ' + ', '.join(settings) if settings else ''}; planned GiB per GPU: {planned} "
              f"(of {entry['capacity_gib']:.1f}: {fits})")
    for job in jobs:
        state = " (done)" if job.done else ""
        print(f"\n[{job.name}]{state} after: {', '.join(job.after) or '-'}")
        for step in job.steps:
            print(f"  {step_command(study, step, slurm)}")


# ---------------------------------------------------------------- running


def outputs_of(job: Job, study: StudyConfig) -> list[Path]:
    """What a job writes besides its own logs: removed before a retry (the trainers refuse a used output_dir)."""
    paths: BackbonePaths = backbone_paths(study, job.name.split(".")[0])
    if job.cell is not None:
        return [job.directory / "run", job.directory / "rm_eval"]
    if job.name.endswith(".prepare"):
        return [paths.hf, paths.policy, paths.reward_init]
    return [paths.stage1, paths.stage2, paths.rm_eval]


def run_local(study: StudyConfig, jobs: list[Job], plan: dict) -> int:
    failed: set[str] = set()
    for job in jobs:
        if job.done:
            print(f"{job.name}: done, skipped")
            continue
        backbone = job.name.split(".")[0]
        blocked = [p for p in job.after if p in failed]
        if blocked or not plan[backbone]["fits"]:
            why = f"after {', '.join(blocked)} failed" if blocked else "the planned layout does not fit"
            print(f"{job.name}: not run: {why}")
            failed.add(job.name)
            continue
        job.directory.mkdir(parents=True, exist_ok=True)
        (job.directory / FAILED).unlink(missing_ok=True)
        for path in outputs_of(job, study):
            shutil.rmtree(path, ignore_errors=True)
        log = job.directory / "log.txt"
        print(f"{job.name}: running (log {log})", flush=True)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        with log.open("w") as out:
            for step in job.steps:
                command = step_command(study, step, slurm=False)
                out.write(f"$ {command}\n")
                out.flush()
                status = subprocess.run(command, shell=True, cwd=REPO, env=env, stdout=out,
                                        stderr=subprocess.STDOUT).returncode
                if status != 0:
                    (job.directory / FAILED).write_text(f"exit status {status}: {command}\n")
                    print(f"{job.name}: FAILED (exit status {status}): {command}; see {log}")
                    failed.add(job.name)
                    break
            else:
                (job.directory / DONE).write_text("")
    return 1 if failed else 0


def queued_jobs() -> set[str]:
    """Ids of this user's Slurm jobs still pending or running."""
    result = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    return set(result.stdout.split()) if result.returncode == 0 else set()


def run_slurm(study: StudyConfig, jobs: list[Job], plan: dict, wait: bool) -> int:
    out = Path(study.output_dir)
    scripts = out / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    ids_file = out / "slurm_jobs.json"
    previous = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    sbatch = shutil.which("sbatch")
    queued = queued_jobs() if sbatch else set()
    ids: dict[str, str] = {}
    for job in jobs:
        script = scripts / f"{job.name}.sbatch"
        script.write_text(sbatch_script(study, job, REPO))
        if job.done:
            print(f"{job.name}: done, skipped")
            continue
        if not plan[job.name.split(".")[0]]["fits"]:
            print(f"{job.name}: not submitted: the planned layout does not fit")
            continue
        if not sbatch:
            continue
        if previous.get(job.name) in queued:
            ids[job.name] = previous[job.name]
            print(f"{job.name}: still queued or running as job {ids[job.name]}")
            continue
        job.directory.mkdir(parents=True, exist_ok=True)
        (job.directory / FAILED).unlink(missing_ok=True)
        for path in outputs_of(job, study):
            shutil.rmtree(path, ignore_errors=True)
        parents = [ids[p] for p in job.after if p in ids]
        # A cell whose parent fails is cancelled rather than left pending forever.
        dependency = [f"--dependency=afterok:{':'.join(parents)}", "--kill-on-invalid-dep=yes"] if parents else []
        result = subprocess.run([sbatch, "--parsable", *dependency, str(script)], cwd=REPO, capture_output=True,
                                text=True)
        if result.returncode != 0:
            print(f"{job.name}: sbatch failed: {result.stderr.strip()}")
            return 1
        ids[job.name] = result.stdout.strip().split(";")[0]
        print(f"{job.name}: submitted as job {ids[job.name]}" + (f" (after {', '.join(parents)})" if parents else ""))
    if not sbatch:
        print(f"sbatch is not on PATH: wrote the scripts to {scripts} without submitting them; submit each with "
              f"sbatch, chaining them with --dependency=afterok as plan.json's 'after' lists")
        return 0
    ids_file.write_text(json.dumps({**previous, **ids}, indent=1) + "\n")
    if wait and ids:
        # Ends once every submitted job has ended, whichever way (a cancelled dependent counts as ended).
        subprocess.run([sbatch, "--wait", "--quiet", f"--dependency=afterany:{':'.join(ids.values())}",
                        f"--output={scripts / 'wait-%j.out'}", "--wrap=true"], cwd=REPO, check=True)
        missing = [j.name for j in jobs if not j.done]
        for name in missing:
            print(f"{name}: did not finish (see its slurm-*.out)")
        return 1 if missing else 0
    return 0


# ---------------------------------------------------------------- collecting

METRICS = ("step_time_s", "tokens_per_s_per_gpu", "peak_gib_measured", "rm_accuracy", "reward", "kl",
           "response_length")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def measured_step_records(records: list[dict]) -> list[dict]:
    """The steps after the first (warm-up: compilation, allocation) when there are more than one."""
    steps = [r for r in records if "time/step_s" in r]
    return steps[1:] if len(steps) > 1 else steps


def benchmark_score(directory: Path, benchmark: str) -> float | None:
    summary = directory / f"{benchmark}.summary.json"
    return json.loads(summary.read_text())["score"] if summary.exists() else None


def cell_row(study: StudyConfig, plan: dict, job: Job) -> dict:
    cell, entry = job.cell, plan[job.cell.backbone]
    layout = entry["layout"]
    row = {"backbone": cell.backbone, "strategy": cell.strategy, "seed": cell.seed,
           "params_total": entry["params_total"], "params_active": entry["params_active"], "gpus": entry["gpus"],
           "layout": f"TP{layout['tp']} PP{layout['pp']} DP{entry['dp']}" + (f" EP{layout['ep']}" if layout["ep"] > 1
                                                                            else ""),
           "peak_gib_planned": entry["planned_gib"][cell.strategy]}
    if job.done:
        row["status"] = "done"
    elif (job.directory / FAILED).exists():
        row["status"] = "failed: " + (job.directory / FAILED).read_text().strip()
    else:
        row["status"] = "missing"
    records = read_records(job.directory / "run" / "metrics.jsonl")
    steps = measured_step_records(records)
    if steps:
        row["step_time_s"] = statistics.fmean(r["time/step_s"] for r in steps)
        rates = [r["throughput/response_tokens_per_s"] for r in steps if "throughput/response_tokens_per_s" in r]
        row["tokens_per_s_per_gpu"] = statistics.fmean(rates) / entry["gpus"] if rates else None
        gpu = [v for r in records for k, v in r.items() if k.startswith("memory/") and k.endswith("_peak_gib")]
        row["peak_gib_measured"] = max(gpu) if gpu else max(r["memory/host_peak_rss_gib"] for r in records
                                                            if "memory/host_peak_rss_gib" in r)
        row["peak_measured_is"] = "gpu" if gpu else "host_rss"
        last = records[-1]
        row["reward"] = last.get("filter/reward_mean")
        row["kl"] = last.get("policy/kl_to_reference")
        row["response_length"] = last.get("rollout/response_length")
    trained = trains_reward_model(cell.strategy)
    rm_eval = job.directory / "rm_eval" if trained else backbone_paths(study, cell.backbone).rm_eval
    row["rm_accuracy"] = benchmark_score(rm_eval, study.recipe.benchmark) if row["status"] == "done" else None
    return row


# Two-sided 95% Student t quantiles by degrees of freedom (then the normal's).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(values: list[float]) -> dict:
    """Mean of per-seed differences and its 95% t interval (none with one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "seeds": len(values)}
    half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(values)}


def comparisons(study: StudyConfig, rows: list[dict]) -> list[dict]:
    """Per backbone and metric: each non-baseline strategy minus the baseline, paired by seed."""
    out, baseline = [], study.recipe.baseline
    for backbone in study.backbones:
        by = {(r["strategy"], r["seed"]): r for r in rows if r["backbone"] == backbone.name and r["status"] == "done"}
        for strategy in (s for s in study.recipe.strategies if s != baseline):
            for metric in METRICS:
                diffs = [by[(strategy, seed)][metric] - by[(baseline, seed)][metric] for seed in study.recipe.seeds
                         if (strategy, seed) in by and (baseline, seed) in by
                         and by[(strategy, seed)].get(metric) is not None
                         and by[(baseline, seed)].get(metric) is not None]
                if diffs:
                    out.append({"backbone": backbone.name, "strategy": strategy, "baseline": baseline,
                                "metric": metric, **paired_difference(diffs)})
    return out


def show(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_plots(study: StudyConfig, rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in METRICS + ("peak_gib_planned",):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for strategy in study.recipe.strategies:
            points = {}
            for r in rows:
                if r["strategy"] == strategy and r["status"] == "done" and r.get(metric) is not None:
                    points.setdefault(r["params_total"], []).append(r[metric])
            xs = sorted(points)
            ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", label=strategy)
        missing = [f"{r['backbone']}/{r['strategy']}_seed{r['seed']}" for r in rows
                   if r["status"] != "done" or r.get(metric) is None]
        ax.set_xscale("log")
        ax.set_xlabel("parameters (total)")
        ax.set_ylabel(metric)
        ax.set_title(metric + (f"\nno value: {', '.join(missing)}" if missing else ""), fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=80)
        plt.close(fig)
        written.append(f"plots/{metric}.png")
    return written


def collect(study: StudyConfig, plan: dict, jobs: list[Job]) -> int:
    out = Path(study.output_dir)
    rows = [cell_row(study, plan, job) for job in jobs if job.cell is not None]
    diffs = comparisons(study, rows)
    plots = write_plots(study, rows, out / "plots")
    provenance = current_provenance()
    (out / "results.json").write_text(json.dumps({"provenance": provenance.as_dict(), "launcher": study.launcher,
                                                  "cluster": asdict(study.cluster), "rows": rows,
                                                  "comparisons": diffs, "plots": plots}, indent=1) + "\n")
    columns = ("backbone", "params_total", "params_active", "strategy", "seed", "status", "layout", "gpus",
               "step_time_s", "tokens_per_s_per_gpu", "peak_gib_planned", "peak_gib_measured", "rm_accuracy",
               "reward", "kl", "response_length")
    lines = ["# Scaling study results", "", "```", provenance.as_text(), "```", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", f"Difference against {study.recipe.baseline}, paired by seed (mean [95% t interval]):", "",
              "| backbone | strategy | metric | mean | interval | seeds |", "|---|---|---|---|---|---|"]
    for d in diffs:
        interval = f"[{d['low']:.4g}, {d['high']:.4g}]" if d["low"] is not None else "- (one seed)"
        lines.append(f"| {d['backbone']} | {d['strategy']} | {d['metric']} | {d['mean']:.4g} | {interval} "
                     f"| {d['seeds']} |")
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(plots)} plots "
          f"({sum(r['status'] == 'done' for r in rows)} of {len(rows)} cells done)")
    return 0


def make_backbone(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scaling_study.py make-backbone")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--hf", help="HF causal LM directory or hub name")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=N", help="a config number of the shape")
    parser.add_argument("--value-head", action="store_true")
    args = parser.parse_args(argv)
    from megatron_save.checkpoint.convert import convert_hf_to_megatron

    if args.hf is None:
        from megatron_save.testing import save_tiny_hf_model

        shape = {}
        for item in args.set:
            key, _, value = item.partition("=")
            if not key or not value.lstrip("-").isdigit():
                parser.error(f"--set {item}: expected KEY=INTEGER, e.g. hidden_size=128")
            shape[key] = int(value)
        source = save_tiny_hf_model(args.family, args.out / "hf", **shape)
    else:
        source = args.hf
    convert_hf_to_megatron(source, args.out / "policy")
    convert_hf_to_megatron(source, args.out / "reward_init", as_reward_model=True, add_value_head=args.value_head)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("plan", "run", "collect"))
    parser.add_argument("study", help="the study YAML")
    parser.add_argument("--wait", action="store_true", help="slurm: return once every submitted job has ended")
    parser.add_argument("overrides", nargs="*", help="key=value settings on top of the study file")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make-backbone"]:
        return make_backbone(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        study = absolute(load_study(args.study, args.overrides))
    except ValueError as error:
        raise SystemExit(f"scaling_study: {error}") from None
    plan, jobs = command_plan(study)
    if args.command == "plan":
        print_plan(study, plan, jobs)
        return 0
    if args.command == "run":
        return run_local(study, jobs, plan) if study.launcher == "local" else run_slurm(study, jobs, plan, args.wait)
    return collect(study, plan, jobs)


if __name__ == "__main__":
    sys.exit(main())
