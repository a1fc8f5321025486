"""The testbed's results over seeds: a table (markdown and JSON, mean and 95% interval) and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_save.testbed.data import read_jsonl
from megatron_save.testbed.task import gold_reward
from megatron_save.utils.provenance import current_provenance

# Two-sided 95% quantiles of Student's t by degrees of freedom; beyond 30 the normal quantile is within 2%.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
PLOT_WINDOW = 5
Sweep = dict[str, dict[float, str]]
# A swept run's name is run@learning-rate (e.g. save@0.0001).
SWEEP_SEPARATOR = "@"
# The positive control: an online RM update whose pairs the gold reward labels (pipeline.RUNS).
CONTROL = "online_gold"
# The pre-registered primary metrics (docs/gold_testbed/README.md).
PRIMARY = ("final_policy_gold", "rm_gain_final_policy_pairs")
# Column name -> what it measures, in table order.
COLUMNS = {
    "final_policy_gold": "gold reward of the final policy (held-out prompts)",
    "gold_last5": "gold reward of the rollouts, last 5 steps",
    "gold_gain": "gold of the last 5 steps minus the first step's",
    "rm_accuracy_initial_policy_pairs": "RM accuracy vs gold, pairs from the initial policy",
    "rm_accuracy_final_policy_pairs": "RM accuracy vs gold, pairs from the run's final policy",
    "proxy_accuracy_final_policy_pairs": "proxy RM's accuracy on those pairs",
    "final_policy_letters": "letters per response of the final policy",
    "keep_rate": "share of responses the filter kept (mean over steps)",
}

# Paired differences (same seed: same data, proxy RM and prompt order), name -> (meaning, run value - reference).
PAIRED = {
    "final_policy_gold_vs_frozen": "final policy's gold minus the frozen run's",
    "gold_last5_vs_frozen": "rollout gold of the last 5 steps minus the frozen run's",
    "rm_accuracy_initial_policy_pairs_vs_proxy": "RM accuracy on the initial policy's pairs minus the proxy's",
    "rm_accuracy_final_policy_pairs_vs_proxy": "RM accuracy on the run's final-policy pairs minus the proxy's",
}

# Pre-registered (docs/gold_testbed/README.md): per comparison [run, reference], the per-seed difference run -
# reference of each metric, its mean and paired 95% t interval; the first two are primary.
COMPARED = {
    "final_policy_gold": "primary: the final policy's gold reward on held-out prompts",
    "rm_gain_final_policy_pairs": "primary: RM accuracy vs gold on the run's final-policy pairs minus the proxy "
                                  "RM's on the same pairs (what the RM learned where the policy went)",
    "rm_accuracy_initial_policy_pairs": "secondary: RM accuracy vs gold on the initial policy's held-out pairs",
    "gold_last5": "secondary: rollout gold of the last 5 steps",
    "probe_drift_last5": "drift: RM accuracy vs gold on the initial policy's fixed pairs, mean of the last 5 steps "
                         "minus step 1's (the proxy's), measured in the run before each step's update",
    "current_policy_gain_last5": "drift: RM accuracy vs gold on each step's own rollout pairs (within groups) minus "
                                 "the proxy RM's on the same pairs, mean of the last 5 steps",
}


def t95(samples: int) -> float:
    """Two-sided 95% Student-t quantile for ``samples`` values (samples - 1 degrees of freedom)."""
    degrees = samples - 1
    return _T95[max(d for d in _T95 if d <= degrees)] if degrees <= 30 else 1.96


def mean_interval(values: list[float]) -> dict[str, float | None]:
    """Mean and the half-width of its 95% t interval (None for a single value); NaNs are left out."""
    finite = [v for v in values if v == v]
    if not finite:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    return {"mean": mean, "ci95": t95(len(finite)) * std / math.sqrt(len(finite)), "n": len(finite)}


def prompt_text(prompt: Any) -> str:
    """The user text of a logged prompt (a string, or chat messages)."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def run_curves(run_dir: Path, evaluation: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Per-step curves of one run: gold reward and letters of the rollouts, the current RM's mean reward, the
    filter's keep rate, and the initial proxy RM's reward (from its gold_eval.json, ``evaluation``)."""
    gold: dict[int, list[float]] = {}
    letters: dict[int, list[float]] = {}
    for row in read_jsonl(run_dir / "rollouts.jsonl"):
        prompt = prompt_text(row["prompt"])
        for response in row["responses"]:
            gold.setdefault(row["step"], []).append(gold_reward(prompt, response))
            letters.setdefault(row["step"], []).append(len("".join(response.split())))
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    current = {int(step): value for step, value in evaluation.get("rm_accuracy_current_policy_by_step", {}).items()}
    proxy_current = {int(step): value for step, value in
                     evaluation.get("proxy_accuracy_current_policy_by_step", {}).items()}
    return {
        "gold": {step: mean(v) for step, v in sorted(gold.items())},
        "letters": {step: mean(v) for step, v in sorted(letters.items())},
        "keep_rate": {m["step"]: m["filter/keep_rate"] for m in metrics if "filter/keep_rate" in m},
        "rm_reward": {m["step"]: m["filter/reward_mean"] for m in metrics if "filter/reward_mean" in m},
        "proxy_reward": {int(step): value for step, value in evaluation["proxy_reward_by_step"].items()},
        "probe_accuracy": {m["step"]: m["rm_probe/accuracy"] for m in metrics if "rm_probe/accuracy" in m},
        "current_policy_accuracy": current,
        "current_policy_gain": {step: current[step] - proxy_current[step] for step in current if step in proxy_current},
    }


def run_summary(evaluation: dict[str, Any], curves: dict[str, dict[int, float]]) -> dict[str, float]:
    """The table's numbers of one run and seed, from its gold_eval.json and its curves."""
    gold = list(curves["gold"].values())
    keep = list(curves["keep_rate"].values())
    probe = list(curves["probe_accuracy"].values())
    gain = list(curves["current_policy_gain"].values())
    return {
        **{key: evaluation[key] for key in ("final_policy_gold", "rm_accuracy_initial_policy_pairs",
                                            "rm_accuracy_final_policy_pairs", "proxy_accuracy_final_policy_pairs",
                                            "final_policy_letters")},
        "rm_gain_final_policy_pairs":
            evaluation["rm_accuracy_final_policy_pairs"] - evaluation["proxy_accuracy_final_policy_pairs"],
        "gold_last5": sum(gold[-5:]) / len(gold[-5:]),
        "gold_gain": sum(gold[-5:]) / len(gold[-5:]) - gold[0],
        "keep_rate": sum(keep) / len(keep) if keep else float("nan"),
        "probe_drift_last5": sum(probe[-5:]) / len(probe[-5:]) - probe[0] if probe else float("nan"),
        "current_policy_gain_last5": sum(gain[-5:]) / len(gain[-5:]) if gain else float("nan"),
    }


def paired_differences(run: dict[str, float], frozen: dict[str, float]) -> dict[str, float]:
    """The PAIRED columns of one run and seed, against that seed's frozen run (the proxy RM's own numbers)."""
    return {
        "final_policy_gold_vs_frozen": run["final_policy_gold"] - frozen["final_policy_gold"],
        "gold_last5_vs_frozen": run["gold_last5"] - frozen["gold_last5"],
        "rm_accuracy_initial_policy_pairs_vs_proxy":
            run["rm_accuracy_initial_policy_pairs"] - frozen["rm_accuracy_initial_policy_pairs"],
        "rm_accuracy_final_policy_pairs_vs_proxy":
            run["rm_accuracy_final_policy_pairs"] - run["proxy_accuracy_final_policy_pairs"],
    }


def verdict(stat: dict[str, float | None], margin: float) -> str:
    """The pre-registered reading of a paired difference: its 95% interval above 0, below 0, inside +-margin, or
    none of these."""
    if stat["ci95"] is None:
        return "undecided"
    low, high = stat["mean"] - stat["ci95"], stat["mean"] + stat["ci95"]
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "no difference" if -margin < low and high < margin else "undecided"


def compare_runs(per_seed: dict[str, list[dict[str, float]]], comparisons: list[tuple[str, str]],
                 margin: float) -> dict[str, dict[str, dict]]:
    """Per comparison "run - reference" and COMPARED metric: the paired differences over seeds, their mean and 95%
    interval, and the verdict."""
    result = {}
    for run, reference in comparisons:
        result[f"{run} - {reference}"] = {
            metric: {**stat, "verdict": verdict(stat, margin)} for metric in COMPARED
            for stat in [mean_interval([a[metric] - b[metric] for a, b in zip(per_seed[run], per_seed[reference])])]}
    return result


# Runs whose RM learns from its own scores (self-labelled): a verdict on them counts only where the positive
# control passes (pre-registered rule (b)): otherwise the testbed cannot tell help or harm from noise.
SELF_LABELLED = ("save", "save_no_curriculum", "save_lagged", "mean_reward", "hl_bt")


def control_passes(compared: dict[str, dict[str, dict]], reference: str = "frozen") -> bool | None:
    """Whether the positive control (``CONTROL - reference``) raises the RM's accuracy where the policy goes
    (rm_gain_final_policy_pairs *higher*); None when the comparisons do not include it."""
    control = compared.get(f"{CONTROL} - {reference}")
    return None if control is None else control["rm_gain_final_policy_pairs"]["verdict"] == "higher"


def counts(comparison: str, passes: bool | None) -> bool:
    """Rule (b)'s gate: a comparison involving a self-labelled run counts only where the control passes."""
    runs = [name.split(SWEEP_SEPARATOR)[0] for name in comparison.split(" - ")]
    return passes is not False or not any(run in SELF_LABELLED for run in runs)


def comparison_readings(compared: dict[str, dict[str, dict]], metrics: tuple[str, ...] = PRIMARY) -> list[str]:
    """Per comparison and primary metric its verdict, with rule (b)'s gate applied: a self-labelled run's verdict
    that does not count says so."""
    passes = control_passes(compared)
    lines = []
    for name, stats in compared.items():
        cells = [f"{metric} {stats[metric]['verdict']} ({_cell(stats[metric])})" for metric in metrics]
        gate = "" if counts(name, passes) else " (not counted: the positive control does not pass)"
        lines.append(f"- `{name}`: " + "; ".join(cells) + gate + ".")
    return lines


def comparison_table(compared: dict[str, dict[str, dict]], margin: float) -> list[str]:
    """The pre-registered comparisons as markdown lines."""
    lines = ["", f"Pre-registered paired comparisons (per-seed difference, mean ± 95% t interval; verdict: interval "
             f"above 0 = higher, below 0 = lower, inside ±{margin} = no difference, else undecided):", "",
             "| comparison | " + " | ".join(COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|"]
    for name, stats in compared.items():
        lines.append(f"| {name} | " + " | ".join(f"{_cell(stats[m])} ({stats[m]['verdict']})" for m in COMPARED)
                     + " |")
    return (lines + ["", "Columns:"] + [f"- `{metric}`: {meaning}" for metric, meaning in COMPARED.items()]
            + ["", "Readings (pre-registered rule (b): a self-labelled run's verdict counts only where "
               f"`{CONTROL} - frozen` raises rm_gain_final_policy_pairs):", "", *comparison_readings(compared)])


def strata(per_seed: dict[str, list[dict[str, float]]], seeds: list[int], threshold: float,
           reference: str = "frozen") -> dict[str, list[int]]:
    """The pre-registered stratification: indices of the seeds whose ``reference`` run's proxy RM accuracy on its
    own final policy's pairs is below ``threshold`` (the policy games the proxy) and of the others."""
    gaming = [i for i, row in enumerate(per_seed[reference]) if row["proxy_accuracy_final_policy_pairs"] < threshold]
    return {"games the proxy": gaming, "others": [i for i in range(len(seeds)) if i not in gaming]}


def stratified_comparisons(per_seed: dict[str, list[dict[str, float]]], comparisons: list[tuple[str, str]],
                           groups: dict[str, list[int]], margin: float) -> dict[str, dict[str, dict[str, dict]]]:
    """stratum -> the comparisons over that stratum's seeds alone."""
    return {name: compare_runs({run: [rows[i] for i in indices] for run, rows in per_seed.items()}, comparisons,
                               margin) for name, indices in groups.items()}


def stratified_lines(stratified: dict[str, dict[str, dict[str, dict]]], groups: dict[str, list[int]],
                     seeds: list[int], threshold: float) -> list[str]:
    """The stratified reading as markdown lines (rule (b)'s gate applied within each stratum)."""
    lines = ["", f"Stratified reading (pre-registered): seeds whose frozen run's proxy accuracy on its final policy's "
             f"pairs is below {threshold} (the frozen policy games the proxy) and the others, each compared apart:"]
    for name, compared in stratified.items():
        lines += ["", f"Stratum \"{name}\": seeds {[seeds[i] for i in groups[name]]}", "",
                  *comparison_readings(compared)]
    return lines


def _cell(stat: dict[str, float | None], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + ("" if stat["ci95"] is None else f" ± {stat['ci95']:.{digits}f}")


def markdown_table(table: dict[str, dict[str, dict]], initial: dict[str, dict], seeds: list[int],
                   paired: dict[str, dict[str, dict]] | None = None) -> str:
    """The results as markdown tables (mean ± 95% interval over seeds; then the paired differences, if any)."""
    lines = [f"Seeds: {seeds}. Cells: mean ± half-width of the 95% t interval over seeds (no interval for one seed).",
             f"Initial (SFT) policy: gold {_cell(initial['gold'])}; proxy RM accuracy on its pairs "
             f"{_cell(initial['proxy_accuracy'])}; proxy RM trained on {_cell(initial['rm_pairs'], 0)} gold pairs "
             f"({_cell(initial['rm_pairs_overlong'], 0)} of them padded past L).",
             "", "| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for run, stats in table.items():
        lines.append(f"| {run} | " + " | ".join(_cell(stats[column]) for column in COLUMNS) + " |")
    lines += ["", "Columns:"] + [f"- `{column}`: {meaning}" for column, meaning in COLUMNS.items()]
    if paired:
        lines += ["", "Paired with the same seed's `frozen` run (same data, proxy RM and prompts): mean ± 95% "
                  "interval of the per-seed differences.", "", "| run | " + " | ".join(PAIRED) + " |",
                  "|---" * (len(PAIRED) + 1) + "|"]
        for run, stats in paired.items():
            lines.append(f"| {run} | " + " | ".join(_cell(stats[column]) for column in PAIRED) + " |")
        lines += ["", "Columns:"] + [f"- `{column}`: {meaning}" for column, meaning in PAIRED.items()]
    return "\n".join(lines) + "\n"


def cost_line(wall: dict[str, Any] | None) -> str:
    """The report's cost in one line (the pipeline's ``wall_time``), empty without one."""
    if not wall:
        return ""
    untimed = wall["steps"] - wall["steps_timed"]
    timed = (f"{wall['seconds_timed'] / 60:.1f} min over {wall['steps_timed']} timed steps (stage-3 runs "
             f"{wall['seconds_timed_rl_runs'] / 60:.1f} min)" if wall["steps_timed"] else "")
    untimed_text = f"{untimed} steps of an older launch recorded no time" if untimed else ""
    span = (f"{wall['span_seconds_first_to_last_finished_step'] / 60:.1f} min from the first to the last finished "
            "step, gaps between launches included")
    return "\nWall time: " + "; ".join(part for part in (timed, untimed_text, span) if part) + ".\n"


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average (shorter windows at the ends): each step's prompts differ, so raw curves are noisy."""
    half = window // 2
    return [sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
            for i in range(len(values))]


def _mean_curve(curves: list[dict[int, float]], window: int) -> tuple[list[int], list[float], list[float]]:
    """Steps, the smoothed mean over seeds and the smoothed 95% half-width."""
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    stats = [mean_interval([c[s] for c in curves]) for s in steps]
    return (steps, moving_average([s["mean"] for s in stats], window),
            moving_average([s["ci95"] or 0.0 for s in stats], window))


def write_plots(curves: dict[str, list[dict[str, dict[int, float]]]], report_dir: Path,
                window: int = PLOT_WINDOW) -> list[Path]:
    """gold_by_step.png, overoptimisation.png (gold against the initial proxy's reward), keep_rate.png and
    letters_by_step.png: means over seeds, shaded 95% intervals, both smoothed over ``window`` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, name in (("gold", "gold reward of rollouts", "gold_by_step"),
                              ("keep_rate", "filter keep rate", "keep_rate"),
                              ("letters", "letters per response", "letters_by_step")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for run, per_seed in curves.items():
            if not all(c[key] for c in per_seed):
                continue
            steps, mean, half = _mean_curve([c[key] for c in per_seed], window)
            axes.plot(steps, mean, label=run)
            axes.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                              alpha=0.08)
        axes.set_xlabel("RL step")
        axes.set_ylabel(f"{ylabel} ({window}-step moving average)")
        axes.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        paths.append(report_dir / f"{name}.png")
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 4))
    for run, per_seed in curves.items():
        _, proxy, _ = _mean_curve([c["proxy_reward"] for c in per_seed], window)
        _, gold, _ = _mean_curve([c["gold"] for c in per_seed], window)
        line, = axes.plot(proxy, gold, marker=".", label=run)
        axes.plot(proxy[-1:], gold[-1:], marker="s", color=line.get_color())
    axes.set_xlabel("initial proxy RM's reward of the rollouts")
    axes.set_ylabel("gold reward of the rollouts")
    axes.set_title(f"over-optimisation: steps run along each curve to the square ({window}-step average)",
                   fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(report_dir / "overoptimisation.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def dose_response(per_seed: dict[str, list[dict[str, float]]], sweep: Sweep, margin: float,
                  reference: str = "frozen") -> dict[str, dict[str, dict[str, dict]]]:
    """run -> RM learning rate -> COMPARED metric -> the paired difference run@lr - reference over seeds (mean, 95%
    interval, verdict)."""
    return {run: {f"{lr:g}": compare_runs(per_seed, [(name, reference)], margin)[f"{name} - {reference}"]
                  for lr, name in by_lr.items()} for run, by_lr in sweep.items()}


def dose_response_readings(dose: dict[str, dict[str, dict[str, dict]]]) -> list[str]:
    """The pre-registered readings (docs/gold_testbed/README.md) of a dose-response: does the positive control
    raise the RM's accuracy where the policy goes, at which learning rates each run helps or hurts, and does SAVE
    drift from gold where the control does not."""
    lines = []
    control = dose.get(CONTROL, {})
    seen = [lr for lr, stats in control.items() if stats["rm_gain_final_policy_pairs"]["verdict"] == "higher"]
    lines.append(f"- Positive control (`{CONTROL} - frozen`, rm_gain_final_policy_pairs higher): "
                 + (f"passes at RM LR {', '.join(seen)}: the testbed can see an online RM improvement there."
                    if seen else "passes at no RM learning rate: **the testbed cannot see the effect SAVE claims** "
                    "at these settings."))
    for run, by_lr in dose.items():
        cells = [f"{lr}: gold {stats['final_policy_gold']['verdict']}, rm_gain "
                 f"{stats['rm_gain_final_policy_pairs']['verdict']}"
                 + ("" if lr in seen or run not in SELF_LABELLED else " (not counted: the control does not pass)")
                 for lr, stats in by_lr.items()]
        lines.append(f"- `{run} - frozen` by RM LR: " + "; ".join(cells) + ".")
    for metric in ("probe_drift_last5", "current_policy_gain_last5"):
        drifts = [lr for lr, stats in dose.get("save", {}).items() if stats[metric]["verdict"] == "lower"
                  and control.get(lr, {}).get(metric, {}).get("verdict") != "lower"]
        lines.append(f"- Drift on `{metric}`: SAVE falls below the frozen proxy where `{CONTROL}` does not at RM LR "
                     + (", ".join(drifts) if drifts else "none") + ".")
    return lines


def dose_response_table(dose: dict[str, dict[str, dict[str, dict]]]) -> list[str]:
    """The dose-response as markdown lines: one row per run and learning rate."""
    lines = ["", "Dose-response: per-seed difference `run@lr - frozen` (mean ± 95% t interval, verdict):", "",
             "| run | RM LR | " + " | ".join(COMPARED) + " |", "|---" * (len(COMPARED) + 2) + "|"]
    for run, by_lr in dose.items():
        for lr, stats in by_lr.items():
            lines.append(f"| {run} | {lr} | " + " | ".join(f"{_cell(stats[m])} ({stats[m]['verdict']})"
                                                            for m in COMPARED) + " |")
    return lines + ["", "Pre-registered readings:", "", *dose_response_readings(dose)]


def write_dose_response_plots(dose: dict[str, dict[str, dict[str, dict]]], curves: dict[str, list[dict]],
                              sweep: Sweep, margin: float, report_dir: Path, window: int = PLOT_WINDOW
                              ) -> list[Path]:
    """dose_response.png (each COMPARED metric's paired difference against the RM learning rate, 95% intervals,
    the equivalence band shaded) and drift.png (per learning rate, by step: the rollouts' gold, the probe accuracy
    and the current-policy gain, means over seeds, ``frozen`` in every column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, 3, figsize=(13, 7))
    for axes, metric in zip(grid.flat, COMPARED):
        for offset, (run, by_lr) in enumerate(dose.items()):
            rates = [float(lr) * (1 + 0.08 * (offset - 1)) for lr in by_lr]  # side by side, not on top
            means = [math.nan if stats[metric]["mean"] is None else stats[metric]["mean"] for stats in by_lr.values()]
            halves = [stats[metric]["ci95"] or 0.0 for stats in by_lr.values()]
            axes.errorbar(rates, means, yerr=halves, marker="o", capsize=3, label=run)
        axes.axhline(0.0, color="black", linewidth=0.8)
        axes.axhspan(-margin, margin, color="grey", alpha=0.15)
        axes.set_xscale("log")
        axes.set_xlabel("RM learning rate")
        axes.set_title(f"{metric} - frozen", fontsize=9)
    grid.flat[0].legend(fontsize=8)
    for axes in list(grid.flat)[len(COMPARED):]:
        axes.axis("off")
    figure.tight_layout()
    paths = [report_dir / "dose_response.png"]
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    rates = sorted({lr for by_lr in sweep.values() for lr in by_lr})
    figure, grid = plt.subplots(3, len(rates), figsize=(4 * len(rates), 10), squeeze=False)
    for column, lr in enumerate(rates):
        names = {"frozen": "frozen", **{run: by_lr[lr] for run, by_lr in sweep.items() if lr in by_lr}}
        for row, (key, label) in enumerate((("gold", "gold reward of rollouts"),
                                            ("probe_accuracy", "RM accuracy, initial policy's fixed pairs"),
                                            ("current_policy_gain", "RM minus proxy accuracy, current pairs"))):
            axes = grid[row][column]
            for run, name in names.items():
                if name in curves and all(c[key] for c in curves[name]):
                    steps, mean, _ = _mean_curve([c[key] for c in curves[name]], window)
                    axes.plot(steps, mean, label=run)
            axes.set_title(f"RM LR {lr:g}", fontsize=9)
            axes.set_xlabel("RL step")
            axes.set_ylabel(f"{label} ({window}-step avg)", fontsize=8)
    grid[0][0].legend(fontsize=8)
    figure.tight_layout()
    paths.append(report_dir / "drift.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def write_report(output_dir: Path, seeds: list[int], runs: list[str], report_dir: Path,
                 settings: dict[str, Any], comparisons: list[tuple[str, str]] = (), margin: float = 0.02,
                 sweep: Sweep | None = None, strata_threshold: float | None = None) -> Path:
    """results.json, results.md and the plots, from every seed's runs under ``output_dir``; with ``comparisons``
    ([run, reference] pairs) also the paired comparisons and their verdicts (and, with ``strata_threshold``, the
    same within each stratum of seeds); with a ``sweep`` the dose-response against ``frozen``, its readings and
    plots."""
    report_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = {run: [output_dir / f"seed_{s}" / "runs" / run for s in seeds] for run in runs}
    evaluations = {run: [json.loads((d / "gold_eval.json").read_text()) for d in dirs]
                   for run, dirs in run_dirs.items()}
    curves = {run: [run_curves(d, e) for d, e in zip(run_dirs[run], evaluations[run])] for run in runs}
    per_seed = {run: [run_summary(e, c) for e, c in zip(evaluations[run], curves[run])] for run in runs}
    table = {run: {column: mean_interval([r[column] for r in rows]) for column in COLUMNS}
             for run, rows in per_seed.items()}
    initial_rows = [json.loads((output_dir / f"seed_{s}" / "data" / "initial_policy.json").read_text())
                    for s in seeds]
    # Every run of a seed carries the same proxy accuracy on the initial policy's pairs.
    proxy_accuracy = [e["proxy_accuracy_initial_policy_pairs"] for e in evaluations[runs[0]]]
    initial = {"gold": mean_interval([r["gold"] for r in initial_rows]),
               "rm_pairs": mean_interval([r["rm_pairs"] for r in initial_rows]),
               "rm_pairs_overlong": mean_interval([r.get("rm_pairs_overlong", 0) for r in initial_rows]),
               "proxy_accuracy": mean_interval(proxy_accuracy)}
    paired = {}
    if "frozen" in runs:
        paired = {run: {column: mean_interval([paired_differences(r, f)[column] for r, f in
                                               zip(rows, per_seed["frozen"])]) for column in PAIRED}
                  for run, rows in per_seed.items() if run != "frozen"}
    compared = compare_runs(per_seed, list(comparisons), margin)
    dose = dose_response(per_seed, sweep, margin) if sweep else {}
    groups = strata(per_seed, seeds, strata_threshold) if strata_threshold is not None and compared else {}
    stratified = stratified_comparisons(per_seed, list(comparisons), groups, margin) if groups else {}
    markdown = markdown_table(table, initial, seeds, paired) + cost_line(settings.get("wall_time"))
    (report_dir / "results.md").write_text(
        markdown + ("\n".join(comparison_table(compared, margin)) + "\n" if compared else "")
        + ("\n".join(stratified_lines(stratified, groups, seeds, strata_threshold)) + "\n" if stratified else "")
        + ("\n".join(dose_response_table(dose)) + "\n" if dose else ""))
    # The runs of a report may come from several launches (seeds=[...] in parts): each evaluation's revision is
    # listed, with the report's own.
    run_revisions = sorted({(e["provenance"]["revision"], e["provenance"]["dirty"]) if "provenance" in e
                            else ("not recorded", True) for es in evaluations.values() for e in es})
    (report_dir / "results.json").write_text(json.dumps(
        {"provenance": current_provenance().as_dict(),
         "run_revisions": [{"revision": r, "dirty": d} for r, d in run_revisions], "seeds": seeds, "initial": initial, "table": table, "paired_with_frozen": paired, "comparisons": compared,
         "comparison_readings": comparison_readings(compared),
         "strata": {name: [seeds[i] for i in indices] for name, indices in groups.items()},
         "stratified_comparisons": stratified,
         "dose_response": dose, "dose_response_readings": dose_response_readings(dose) if dose else [],
         "per_seed": per_seed,
         "curves": {run: [{k: {str(s): v for s, v in c.items()} for k, c in cs.items()} for cs in per_run]
                    for run, per_run in curves.items()}, "settings": settings}, indent=2) + "\n")
    swept = {name for by_lr in (sweep or {}).values() for name in by_lr.values()}
    write_plots({run: c for run, c in curves.items() if run not in swept}, report_dir)  # drift.png has the rest
    if dose:
        write_dose_response_plots(dose, curves, sweep, margin, report_dir)
    return report_dir
