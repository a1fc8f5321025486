"""The gold-reward testbed end to end: for each seed, task data -> a tiny policy -> SFT of the initial policy ->
an RM initialised from it -> gold-labelled pairs from the policy -> proxy RM (stages 1 and 2) -> one stage-3 run
per RM strategy -> measurements against gold; then the results table and plots over seeds.

Every Megatron step is a ``torchrun`` child process running the project's own trainers; its output goes to
``output_dir/logs/``, and the progress of the step in flight is shown on one bar. A step that finished is not
run again when the command is repeated with the same settings; an interrupted one starts over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from megatron_save.testbed.data import TaskDataSizes, write_task_data
from megatron_save.testbed.report import SWEEP_SEPARATOR
from megatron_save.testbed.task import GoldTaskSettings
from megatron_save.utils.logging import get_logger

logger = get_logger("testbed.pipeline")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "testbed"

# Stage-3 runs by name: the RM strategy and the paper's "SAVE w/o policy optimization".
RUNS: dict[str, list[str]] = {
    "frozen": ["reward.strategy=frozen"],
    "save": ["reward.strategy=save"],
    "save_no_curriculum": ["reward.strategy=save_no_curriculum"],
    "hl_bt": ["reward.strategy=hl_bt"],
    "mean_reward": ["reward.strategy=mean_reward"],
    "offline_bt": ["reward.strategy=offline_bt"],
    "save_frozen_policy": ["reward.strategy=save", "policy.frozen=true"],
    # SAVE scoring the policy update with the pre-update RM (no re-score; the paper re-scores, Algorithm 2 line 15).
    "save_lagged": ["reward.strategy=save", "reward.lagged_scores=true"],
    # PRIME (RLOO, its own estimator) with labels from the proxy RM, as the paper runs it on UltraFeedback...
    "prime": ["reward.strategy=prime", "policy.advantage=rloo"],
    # ... and with the task's gold reward as its verifier: an upper reference, not a comparable RM strategy.
    "prime_gold_verifier": ["reward.strategy=prime", "policy.advantage=rloo", "reward.prime.labels=verifier",
                            "reward.verifier=megatron_save.testbed.task:gold_reward"],
    # The positive control (not a paper baseline): the RM updated online on the same groups with the same optimizer,
    # on each group's highest- vs lowest-gold response (Bradley-Terry). If this does not raise the RM's accuracy
    # where the policy goes, the testbed cannot see the effect SAVE claims.
    "online_gold": ["reward.strategy=verifier_hl_bt", "reward.verifier=megatron_save.testbed.task:gold_reward"],
    # The oracle: the policy trained on the gold reward itself (the RM frozen, probed only), the same GRPO settings;
    # the ceiling of what any RM strategy could give the policy here.
    "oracle": ["reward.strategy=verifier_reward", "reward.verifier=megatron_save.testbed.task:gold_reward"],
}


@dataclass
class StageConfigs:
    """The YAML configs of the trainers (paths are filled in by the pipeline)."""

    sft: str = str(EXAMPLES / "sft.yaml")
    """Supervised fine-tuning of the initial policy."""
    stage1: str = str(EXAMPLES / "stage1_bt.yaml")
    """Bradley-Terry training of the proxy RM."""
    stage2: str = str(EXAMPLES / "stage2_value.yaml")
    """Value head of the proxy RM."""
    stage3: str = str(EXAMPLES / "stage3.yaml")
    """The RL runs (reward.strategy is set per run)."""


@dataclass
class TestbedConfig:
    """A testbed comparison: which RM strategies, how many seeds, which settings."""

    output_dir: str = "outputs/gold_testbed"
    """Models, logs and per-run measurements."""
    report_dir: str | None = None
    """Where results.md, results.json and the plots go (default: output_dir/report)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One full pipeline per seed (data, models, every run)."""
    runs: list[str] = field(default_factory=lambda: ["frozen", "save"])
    """Stage-3 runs to compare, names from RUNS."""
    nproc: int = 2
    """Processes per torchrun step (the trainers' configs set TP / PP)."""
    family: str = "llama"
    """Tiny model family of the policy (llama, qwen2, qwen3); the RM starts from the SFT policy."""
    reward_head_std: float = 0.02
    """Initial standard deviation of the RM's fresh reward head (transformers' initialisation)."""
    overlong_pair_share: float = 0.0
    """Share of the proxy RM's pairs that contrast a sample with itself padded past L (regime two; 0: regime one)."""
    rm_learning_rates: list[float] = field(default_factory=list)
    """Dose-response: each of swept_runs also runs at each of these RM learning rates (reward.optim.lr), named
    run@lr (e.g. save@0.0001), beside the runs above at the stage-3 config's own."""
    swept_runs: list[str] = field(default_factory=list)
    """Runs (names from RUNS) repeated at every rm_learning_rates value."""
    value_head_lr_ratio: float = 500.0
    """A swept run's value-head learning rate is this x its RM learning rate (stage3.yaml's 5e-3 / 1e-5)."""
    comparisons: list[list[str]] = field(default_factory=list)
    """Pre-registered paired comparisons [run, reference] for the report's verdict table (run names, swept ones
    included)."""
    equivalence_margin: float = 0.02
    """A paired difference whose 95% interval lies inside +-margin reads "no difference" in the verdict table."""
    strata_proxy_accuracy: float | None = None
    """Stratified reading of the comparisons: seeds whose frozen run's proxy RM accuracy on its final policy's pairs
    is below this (the frozen policy games the proxy) and the others, compared apart; null: no strata."""
    sample_max_new_tokens: int = 16
    """Longest response when sampling pairs and evaluating (keep equal to stage 3's rollout.sampling)."""
    configs: StageConfigs = field(default_factory=StageConfigs)
    """Trainer configs."""
    sft_overrides: list[str] = field(default_factory=list)
    """key=value overrides of the SFT config."""
    stage1_overrides: list[str] = field(default_factory=list)
    """key=value overrides of the stage-1 config."""
    stage2_overrides: list[str] = field(default_factory=list)
    """key=value overrides of the stage-2 config."""
    stage3_overrides: list[str] = field(default_factory=list)
    """key=value overrides of every stage-3 run (e.g. total_steps=4)."""
    task: GoldTaskSettings = field(default_factory=GoldTaskSettings)
    """Prompts and demonstrations."""
    sizes: TaskDataSizes = field(default_factory=TaskDataSizes)
    """Prompt counts of each part."""


def swept_name(run: str, learning_rate: float) -> str:
    """The name of ``run`` at RM learning rate ``learning_rate``."""
    return f"{run}{SWEEP_SEPARATOR}{learning_rate:g}"


def run_table(cfg: TestbedConfig) -> dict[str, list[str]]:
    """Every stage-3 run of a seed, name -> its overrides: ``runs``, then ``swept_runs`` at each RM learning rate
    (the value head's scaled with it)."""
    table = {name: RUNS[name] for name in cfg.runs}
    for learning_rate in cfg.rm_learning_rates:
        for name in cfg.swept_runs:
            table[swept_name(name, learning_rate)] = [
                *RUNS[name], f"reward.optim.lr={learning_rate:g}",
                f"reward.optim.value_head_lr={learning_rate * cfg.value_head_lr_ratio:g}"]
    return table


def check_testbed_config(cfg: TestbedConfig) -> None:
    """Refuses unknown run names and an empty comparison before any work."""
    unknown = [name for name in [*cfg.runs, *cfg.swept_runs] if name not in RUNS]
    if unknown:
        raise ValueError(f"runs / swept_runs: unknown {unknown}; choose from {sorted(RUNS)}")
    if not cfg.runs or not cfg.seeds:
        raise ValueError("runs and seeds must each name at least one")
    if bool(cfg.swept_runs) != bool(cfg.rm_learning_rates) or any(lr <= 0 for lr in cfg.rm_learning_rates):
        raise ValueError(f"swept_runs {cfg.swept_runs} and rm_learning_rates {cfg.rm_learning_rates} go together "
                         "(positive learning rates)")
    repeated = [values for values in (cfg.seeds, cfg.runs, cfg.swept_runs, cfg.rm_learning_rates)
                if len(set(values)) != len(values)]
    if repeated:
        raise ValueError(f"{repeated[0]} must not repeat (seeds, runs, swept_runs, rm_learning_rates)")
    names = list(run_table(cfg))
    for comparison in cfg.comparisons:
        if len(comparison) != 2 or not set(comparison) <= set(names) or comparison[0] == comparison[1]:
            raise ValueError(f"comparisons: {comparison} must be [run, reference], two different names from "
                             f"{names}")
    if not 0.0 <= cfg.overlong_pair_share <= 1.0 or cfg.equivalence_margin <= 0:
        raise ValueError(f"overlong_pair_share {cfg.overlong_pair_share} must be in [0, 1] and equivalence_margin "
                         f"{cfg.equivalence_margin} positive")


def torchrun(cfg: TestbedConfig, command: str, *args: str) -> list[str]:
    """The command line of ``python -m megatron_save COMMAND`` under torchrun with the interpreter running the
    pipeline."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}", "-m",
            "megatron_save", command, *args]


def _progress_of(log: Path) -> str:
    """The last 'i/n' progress fragment a child wrote, with its label (empty when there is none yet)."""
    with open(log, "rb") as handle:
        handle.seek(max(0, log.stat().st_size - 4096))
        tail = handle.read().decode(errors="replace")
    fragments = re.findall(r"([\w ()-]*?): *\d+%\|[^|]*\| *(\d+/\d+)", tail)
    return f"{fragments[-1][0].strip()} {fragments[-1][1]}" if fragments else ""


def run_child(command: list[str], log: Path, bar: tqdm) -> None:
    """Runs one step, its output into ``log``; raises with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        while child.poll() is None:
            time.sleep(1.0)
            bar.set_postfix_str(_progress_of(log), refresh=True)
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"testbed step failed (exit {child.returncode}): {' '.join(command)}\n"
                           f"--- last lines of {log} ---\n{tail}")


class Steps:
    """Runs named steps once: a step whose marker exists (from an earlier launch) is skipped; one without a marker
    starts over, its outputs from an interrupted launch removed first."""

    def __init__(self, cfg: TestbedConfig, total: int):
        self.cfg, self.root = cfg, Path(cfg.output_dir)
        self.bar = tqdm(total=total, desc="gold testbed", unit="step", dynamic_ncols=True)

    def run(self, name: str, command: list[str] | None = None, action=None, outputs: tuple[Path, ...] = ()
            ) -> None:
        marker = self.root / "done" / name.replace("/", "__")
        self.bar.set_description(f"gold testbed: {name}")
        if not marker.exists():
            for output in outputs:
                shutil.rmtree(output, ignore_errors=True)
            start = time.monotonic()
            if command is not None:
                run_child(command, self.root / "logs" / f"{name.replace('/', '__')}.log", self.bar)
            if action is not None:
                action()
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"seconds": time.monotonic() - start}) + "\n")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def seed_steps(cfg: TestbedConfig, steps: Steps, seed: int) -> None:
    """The whole pipeline of one seed."""
    seed_models(cfg, steps, seed)
    seed_runs(cfg, steps, seed)


def seed_models(cfg: TestbedConfig, steps: Steps, seed: int) -> None:
    """What every run of a seed starts from: the task data, the SFT policy, its gold-labelled samples and the
    proxy RM."""
    root = Path(cfg.output_dir) / f"seed_{seed}"
    data, models = root / "data", root / "models"
    configs = cfg.configs
    steps.run(f"seed_{seed}/data", action=lambda: write_task_data(data, seed, cfg.sizes, cfg.task), outputs=(data,))
    initial_models = [sys.executable, "-m", "megatron_save", "testbed-models"]
    steps.run(f"seed_{seed}/initial_policy", [*initial_models, "policy", "--out", str(models), "--seed", str(seed),
                                              "--family", cfg.family], outputs=(models,))
    steps.run(f"seed_{seed}/sft", torchrun(
        cfg, "sft", configs.sft, f"checkpoint={models / 'policy_init'}",
        f"output_dir={models / 'policy_sft'}", f"data.train_data={data / 'demonstrations.jsonl'}",
        f"batch.seed={seed}", *cfg.sft_overrides), outputs=(models / "policy_sft",))
    steps.run(f"seed_{seed}/initial_reward_model", [
        *initial_models, "reward-model", "--out", str(models), "--policy", str(models / "policy_sft"),
        "--seed", str(seed), "--reward-head-std", str(cfg.reward_head_std)],
        outputs=tuple(models / name for name in ("hf_policy_export", "rm_init")))
    steps.run(f"seed_{seed}/collect", torchrun(
        cfg, "testbed-eval", "collect", "--policy", str(models / "policy_sft"),
        "--data-dir", str(data), "--seed", str(seed), "--max-new-tokens", str(cfg.sample_max_new_tokens),
        "--overlong-pair-share", str(cfg.overlong_pair_share), "--tp", str(cfg.nproc)))
    steps.run(f"seed_{seed}/stage1", torchrun(
        cfg, "stage1", configs.stage1, f"checkpoint={models / 'rm_init'}",
        f"output_dir={models / 'rm_stage1'}", f"data.train_data={data / 'rm_pairs.jsonl'}", f"batch.seed={seed}",
        *cfg.stage1_overrides), outputs=(models / "rm_stage1",))
    steps.run(f"seed_{seed}/stage2", torchrun(
        cfg, "stage2", configs.stage2, f"checkpoint={models / 'rm_stage1'}",
        f"output_dir={models / 'proxy_rm'}", f"data.train_data={data / 'value_groups.jsonl'}", f"batch.seed={seed}",
        *cfg.stage2_overrides), outputs=(models / "proxy_rm",))


def seed_runs(cfg: TestbedConfig, steps: Steps, seed: int) -> None:
    """The seed's stage-3 runs and their measurements against gold."""
    root = Path(cfg.output_dir) / f"seed_{seed}"
    data, models, configs = root / "data", root / "models", cfg.configs
    runs = run_table(cfg)
    for name, overrides in runs.items():
        # Every run measures its RM each step on the initial policy's held-out pairs (the drift curve).
        steps.run(f"seed_{seed}/rl_{name}", torchrun(
            cfg, "stage3", configs.stage3, f"output_dir={root / 'runs' / name}",
            f"train_data={data / 'rl_prompts.jsonl'}", f"policy.checkpoint={models / 'policy_sft'}",
            f"reward.checkpoint={models / 'proxy_rm'}", f"reward.offline_data={data / 'rm_pairs.jsonl'}",
            f"reward.probe_data={data / 'eval_pairs_initial_policy.jsonl'}", f"seed={seed}", "resume=false",
            *overrides, *cfg.stage3_overrides), outputs=(root / "runs" / name,))
    steps.run(f"seed_{seed}/evaluate", torchrun(
        cfg, "testbed-eval", "evaluate", *[str(root / "runs" / name) for name in runs],
        "--data-dir", str(data), "--policy-init", str(models / "policy_sft"), "--proxy-rm",
        str(models / "proxy_rm"), "--seed", str(seed), "--max-new-tokens", str(cfg.sample_max_new_tokens),
        "--tp", str(cfg.nproc)))


# Settings that do not change any seed's steps: a launch may name other seeds or runs (a comparison run in parts,
# each seed and run its own steps) or another report without starting over.
NOT_PER_STEP = ("seeds", "runs", "swept_runs", "rm_learning_rates", "value_head_lr_ratio", "report_dir",
                "comparisons", "equivalence_margin", "strata_proxy_accuracy")


def prepare_output_dir(cfg: TestbedConfig) -> None:
    """Keeps the settings in output_dir/testbed.yaml; refuses to continue an earlier launch whose steps were made
    with other settings (NOT_PER_STEP aside)."""
    root = Path(cfg.output_dir)
    steps_settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_PER_STEP}
    saved, settings = root / "testbed.yaml", OmegaConf.to_yaml(OmegaConf.create(steps_settings))
    if saved.exists() and saved.read_text() != settings:
        raise FileExistsError(f"{root} holds a testbed run with other settings ({saved}); choose another "
                              "output_dir or remove it")
    if not saved.exists() and root.exists() and any(root.iterdir()):
        raise FileExistsError(f"output_dir {root} exists, is not empty and is not a testbed run")
    root.mkdir(parents=True, exist_ok=True)
    saved.write_text(settings)


def wall_time(cfg: TestbedConfig) -> dict[str, float | int | str]:
    """What the report's seeds cost: the seconds of every finished step that recorded them (its marker), summed
    over all and over the stage-3 runs, and the steps that did not (markers of an older launch are empty); the span
    from the first to the last finished step (launch gaps included) for those."""
    markers = [m for seed in cfg.seeds for m in (Path(cfg.output_dir) / "done").glob(f"seed_{seed}__*")]
    texts = {m.name: m.read_text() for m in markers}
    seconds = {name: json.loads(text)["seconds"] for name, text in texts.items() if text.strip()}
    finished = sorted(m.stat().st_mtime for m in markers)
    return {"steps": len(markers), "steps_timed": len(seconds), "seconds_timed": sum(seconds.values()),
            "seconds_timed_rl_runs": sum(v for k, v in seconds.items() if "__rl_" in k),
            "span_seconds_first_to_last_finished_step": finished[-1] - finished[0] if finished else 0.0}


def run_testbed(cfg: TestbedConfig) -> Path:
    """Runs (or continues) every seed, then writes the report; returns the report directory."""
    from megatron_save.testbed.report import write_report

    check_testbed_config(cfg)
    prepare_output_dir(cfg)
    runs = list(run_table(cfg))
    steps = Steps(cfg, total=len(cfg.seeds) * (8 + len(runs)) + 1)
    try:
        for seed in cfg.seeds:
            seed_steps(cfg, steps, seed)
        report_dir = Path(cfg.report_dir or Path(cfg.output_dir) / "report")
        steps.bar.set_description("gold testbed: report")
        sweep = {run: {lr: swept_name(run, lr) for lr in cfg.rm_learning_rates} for run in cfg.swept_runs}
        write_report(Path(cfg.output_dir), cfg.seeds, runs, report_dir, {**asdict(cfg), "wall_time": wall_time(cfg)},
                     [tuple(c) for c in cfg.comparisons], cfg.equivalence_margin, sweep, cfg.strata_proxy_accuracy)
        steps.bar.update()
    finally:
        steps.close()
    return report_dir
