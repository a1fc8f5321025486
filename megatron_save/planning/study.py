"""A scaling study: the study file's schema, its cells, and the jobs (exact command lines) that run them.

A study runs one recipe (stages 1-3, strategies such as ``frozen`` and ``save``, seeds) on a ladder of backbones.
Per backbone there are three kinds of job, each with its own directory and a ``DONE`` marker written when all its
commands succeeded: ``prepare`` (the models: a random one made from its shape, or a Hugging Face one, converted
into the policy and the reward model to start from, BackbonePaths' layout), ``rm`` (stages 1 and 2 on the reward model and its benchmark
score), and one ``cell`` per (strategy, seed) (stage 3, then the benchmark score of the reward model it leaves).
``tools/scaling_study.py`` plans, runs and collects them; this module only builds the objects and the commands,
so what ``plan`` prints is what ``run`` runs.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from megatron_save.config import load_config

LAUNCHERS = ("local", "slurm")
STAGES = ("stage1", "stage2", "stage3")
DONE = "DONE"
RDZV_PORT = 29500


@dataclass
class BackboneSpec:
    """One rung of the ladder: a Hugging Face causal LM, or a tiny random shape (tests, cost studies)."""

    name: str = MISSING
    """Row label and directory name (letters, digits, ``-``, ``_``, ``.``)."""
    hf: str | None = None
    """Hugging Face directory or hub name of a causal LM (the policy; the reward model starts from it too)."""
    config: str | None = None
    """HF config (a directory holding config.json) the planner reads instead of ``hf``'s: for a hub name on a
    machine without hub access (planning before the cluster)."""
    shape: dict[str, int] | None = None
    """Instead of ``hf``: transformers config numbers of a random model (hidden_size, num_hidden_layers, ...)."""
    family: str = "llama"
    """Family of a ``shape`` backbone (megatron_save.testing's tiny families: llama, qwen2, qwen3, qwen3_moe)."""


@dataclass
class RecipeSpec:
    """What every backbone runs: the stages, the strategies compared, their seeds, the data."""

    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in order; stage3 is required. Without stage1 / stage2 the converted reward model (with a
    zero value head) goes straight on."""
    strategies: list[str] = field(default_factory=lambda: ["frozen", "save"])
    """Stage 3's reward.strategy values compared."""
    baseline: str = "frozen"
    """The strategy SAVE is compared against (SAVE minus baseline, paired by seed)."""
    seeds: list[int] = field(default_factory=lambda: [1])
    """Stage 3's seed of each repetition."""
    stage1_configs: list[str] = field(default_factory=lambda: ["examples/paper/stage1_bt.yaml"])
    """Stage-1 YAML files, merged in order."""
    stage2_configs: list[str] = field(default_factory=lambda: ["examples/paper/stage2_value_anchor.yaml"])
    """Stage-2 YAML files."""
    stage3_configs: list[str] = field(default_factory=lambda: ["examples/paper/stage3_save.yaml"])
    """Stage-3 YAML files."""
    stage1_overrides: list[str] = field(default_factory=list)
    """key=value settings added to every stage-1 launch."""
    stage2_overrides: list[str] = field(default_factory=list)
    """key=value settings added to every stage-2 launch."""
    stage3_overrides: list[str] = field(default_factory=list)
    """key=value settings added to every stage-3 launch."""
    preference_train: str | None = None
    """Stage 1's training pairs (data.train_data); None keeps the YAML's."""
    preference_eval: str | None = None
    """Stage 1's held-out pairs (data.eval_data); None keeps the YAML's."""
    value_data: str | None = None
    """Stage 2's response groups (data.train_data); None keeps the YAML's."""
    prompts: str | None = None
    """Stage 3's prompts (train_data); None keeps the YAML's."""
    benchmark: str = "rewardbench"
    """RM benchmark scored by tools/eval_rm.py after stage 2 and after each stage-3 run that trains the RM."""
    benchmark_data: str | None = None
    """The benchmark's data (file, directory or hub name); None skips the RM evaluation."""


@dataclass
class ClusterSpec:
    """Where each cell runs, and what the memory planner fits the layout into."""

    nodes: int = 1
    """Nodes per job (local: 1)."""
    gpus_per_node: int = 1
    """GPUs (on CPU: processes) per node."""
    memory_per_gpu: str = "80GB"
    """Memory of one GPU, for the planner ('80GB', '141GB', '16GiB')."""
    request_gpus: bool = True
    """Ask Slurm for the GPUs (#SBATCH --gpus-per-node) of the jobs that train or score; false on a CPU cluster."""
    partition: str | None = None
    """Slurm partition (#SBATCH --partition); None: the cluster's default."""
    time: str = "24:00:00"
    """Slurm time limit of each job."""
    cpus_per_task: int | None = None
    """Slurm --cpus-per-task (one task per node); None: the cluster's default."""
    sbatch_args: list[str] = field(default_factory=list)
    """More #SBATCH options, written as given ('--account=abc', '--exclusive')."""


@dataclass
class RunShape:
    """The run's sizes the memory planner needs (match them to the stage-3 YAML)."""

    dtype: str = "bf16"
    """Parameter dtype (bf16 or fp32)."""
    spec: str = "te"
    """Layer spec: te (Transformer Engine) or local (CPU)."""
    prompt_length: int = 1024
    """Longest prompt (tokens)."""
    response_length: int = 1024
    """Longest response (tokens)."""
    micro_batch: int = 4
    """Policy sequences per forward-backward (policy.micro_batch_size)."""
    reward_micro_batch: int = 16
    """Reward-model sequences per forward-backward (reward.micro_batch_size x G)."""
    rollout_batch: int = 64
    """Sequences generated at once (rollout.max_batch_size)."""


@dataclass
class StudyConfig:
    """A scaling study: the backbones, the recipe, the cluster, the launcher."""

    output_dir: str = MISSING
    """Where every job's directory, the scripts and results.md / results.json go."""
    launcher: str = "local"
    """local: the jobs run one after another on this machine (torchrun); slurm: one sbatch script per job."""
    backbones: list[BackboneSpec] = field(default_factory=list)
    """The ladder, smallest first."""
    recipe: RecipeSpec = field(default_factory=RecipeSpec)
    """What each backbone runs."""
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    """The machines of each job."""
    run_shape: RunShape = field(default_factory=RunShape)
    """Sizes for the memory planner."""


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """The study file, checked (ValueError naming the file and the setting)."""
    study = load_config(StudyConfig, path, overrides)
    problems = study_problems(study)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return study


def study_problems(study: StudyConfig) -> list[str]:
    """Every setting that cannot run, named."""
    problems = []
    if study.launcher not in LAUNCHERS:
        problems.append(f"launcher={study.launcher!r}: choose from {LAUNCHERS}")
    if not study.backbones:
        problems.append("backbones: empty")
    names = [b.name for b in study.backbones]
    for index, backbone in enumerate(study.backbones):
        if (backbone.hf is None) == (backbone.shape is None):
            problems.append(f"backbones[{index}] ({backbone.name}): give exactly one of hf, shape")
        if not backbone.name or not all(c.isalnum() or c in "-_." for c in backbone.name):
            problems.append(f"backbones[{index}].name={backbone.name!r}: letters, digits, '-', '_', '.' only")
    if len(set(names)) != len(names):
        problems.append(f"backbones: names repeat ({names})")
    recipe = study.recipe
    unknown = [s for s in recipe.stages if s not in STAGES]
    if unknown or "stage3" not in recipe.stages or list(recipe.stages) != sorted(recipe.stages):
        problems.append(f"recipe.stages={recipe.stages}: stages from {STAGES} in order, stage3 included")
    if not recipe.strategies or not recipe.seeds:
        problems.append("recipe.strategies and recipe.seeds must not be empty")
    if len(recipe.strategies) > 1 and recipe.baseline not in recipe.strategies:
        problems.append(f"recipe.baseline={recipe.baseline!r} is not one of recipe.strategies {recipe.strategies}")
    cluster = study.cluster
    if cluster.nodes < 1 or cluster.gpus_per_node < 1:
        problems.append(f"cluster: nodes={cluster.nodes}, gpus_per_node={cluster.gpus_per_node} must be >= 1")
    if study.launcher == "local" and cluster.nodes != 1:
        problems.append(f"launcher=local runs on this machine: cluster.nodes={cluster.nodes} must be 1")
    return problems


@dataclass(frozen=True)
class Cell:
    """One stage-3 run of the study: a backbone, a strategy, a seed."""

    backbone: str
    strategy: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}_seed{self.seed}"


def cells_of(study: StudyConfig) -> list[Cell]:
    """Every cell, backbone by backbone (the ladder's order), then strategy, then seed."""
    return [Cell(b.name, s, seed) for b in study.backbones for s in study.recipe.strategies
            for seed in study.recipe.seeds]


@dataclass(frozen=True)
class Layout:
    """The parallel layout and memory settings a backbone runs with (from the memory planner)."""

    tp: int = 1
    """Tensor-parallel size of every stage."""
    pp: int = 1
    """Pipeline-parallel size of every stage."""
    ep: int = 1
    """Expert-parallel size (MoE backbones)."""
    distributed_optimizer: bool = False
    """Optimizer states sharded over data-parallel ranks."""
    stage3: list[str] = field(default_factory=list)
    """Stage 3's further key=value settings the planner chose (recompute, token budgets, offload), as its
    refusals name them."""

    def overrides(self, stage: str, trains_reward_model: bool = True) -> list[str]:
        """The key=value settings that apply this layout to a ``stage`` launch (stage 3: the reward model's own
        settings only where its strategy trains it; a frozen reward model refuses them)."""
        out = [f"parallel.tensor_model_parallel_size={self.tp}", f"parallel.pipeline_model_parallel_size={self.pp}"]
        out += [f"parallel.expert_model_parallel_size={self.ep}"] if self.ep > 1 else []
        if self.distributed_optimizer:
            out += ["policy.optim.use_distributed_optimizer=true", "reward.optim.use_distributed_optimizer=true"] \
                if stage == "stage3" else ["optim.use_distributed_optimizer=true"]
        if stage != "stage3":
            return out
        return out + [s for s in self.stage3 if trains_reward_model or not s.startswith("reward.")]


@dataclass(frozen=True)
class Step:
    """One command of a job: ``trainer`` steps run under the launcher (torchrun or srun + torchrun), ``python``
    steps as one process on the job's first node."""

    kind: str
    argv: tuple[str, ...]


@dataclass
class Job:
    """A unit the launcher runs: its directory (``DONE`` inside once every step succeeded), steps and parents."""

    name: str
    directory: Path
    steps: list[Step]
    after: list[str]
    cell: Cell | None = None

    @property
    def done(self) -> bool:
        return (self.directory / DONE).exists()


@dataclass(frozen=True)
class BackbonePaths:
    """Where a backbone's jobs write."""

    root: Path

    @property
    def hf(self) -> Path:
        return self.root / "models" / "hf"

    @property
    def policy(self) -> Path:
        return self.root / "models" / "policy"

    @property
    def reward_init(self) -> Path:
        return self.root / "models" / "reward_init"

    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    @property
    def rm_eval(self) -> Path:
        return self.root / "rm_eval"

    def cell(self, cell: Cell) -> Path:
        return self.root / cell.name


def backbone_paths(study: StudyConfig, backbone: str) -> BackbonePaths:
    return BackbonePaths(Path(study.output_dir) / backbone)


def _eval_step(study: StudyConfig, checkpoint: Path, out: Path, layout: Layout) -> list[Step]:
    recipe = study.recipe
    if recipe.benchmark_data is None:
        return []
    argv = ("tools/eval_rm.py", "--benchmark", recipe.benchmark, "--data", recipe.benchmark_data, "--ckpt",
            str(checkpoint), "--tp", str(layout.tp), "--pp", str(layout.pp), "--out", str(out))
    return [Step("eval", argv)]


def jobs_of(study: StudyConfig, layouts: dict[str, Layout], trains_reward_model: Callable[[str], bool]) -> list[Job]:
    """Every job of the study in dependency order; ``layouts`` gives each backbone's layout,
    ``trains_reward_model(strategy)`` whether a stage-3 strategy trains (and writes) a reward model."""
    recipe = study.recipe
    jobs = []
    for backbone in study.backbones:
        paths, layout = backbone_paths(study, backbone.name), layouts[backbone.name]
        # One process makes (a shape backbone) and converts the models: the policy, and the reward model to start
        # from (with a zero value head when stage 2 does not fit one).
        source = ("--hf", backbone.hf) if backbone.shape is None else (
            "--family", backbone.family, *(f"--set={key}={value}" for key, value in sorted(backbone.shape.items())))
        value_head = () if "stage2" in recipe.stages else ("--value-head",)
        prepare = [Step("python", ("tools/scaling_study.py", "make-backbone", "--out", str(paths.root / "models"),
                                   *source, *value_head))]
        jobs.append(Job(f"{backbone.name}.prepare", paths.root / "models", prepare, []))

        rm_steps, reward = [], paths.reward_init
        if "stage1" in recipe.stages:
            data = [f"data.train_data={recipe.preference_train}"] if recipe.preference_train else []
            data += [f"data.eval_data={recipe.preference_eval}"] if recipe.preference_eval else []
            rm_steps.append(Step("trainer", ("stage1", *recipe.stage1_configs, f"checkpoint={reward}",
                                             f"output_dir={paths.stage1}", *data, *layout.overrides("stage1"),
                                             *recipe.stage1_overrides)))
            reward = paths.stage1
        if "stage2" in recipe.stages:
            data = [f"data.train_data={recipe.value_data}"] if recipe.value_data else []
            rm_steps.append(Step("trainer", ("stage2", *recipe.stage2_configs, f"checkpoint={reward}",
                                             f"output_dir={paths.stage2}", *data, *layout.overrides("stage2"),
                                             *recipe.stage2_overrides)))
            reward = paths.stage2
        rm_steps += _eval_step(study, reward, paths.rm_eval, layout)
        rm_job = Job(f"{backbone.name}.rm", paths.root / "rm", rm_steps, [jobs[-1].name])
        jobs.append(rm_job)

        for cell in (c for c in cells_of(study) if c.backbone == backbone.name):
            out = paths.cell(cell)
            data = [f"train_data={recipe.prompts}"] if recipe.prompts else []
            steps = [Step("trainer", ("stage3", *recipe.stage3_configs, f"output_dir={out / 'run'}", *data,
                                      f"policy.checkpoint={paths.policy}", f"reward.checkpoint={reward}",
                                      f"reward.strategy={cell.strategy}", f"seed={cell.seed}",
                                      *layout.overrides("stage3", trains_reward_model(cell.strategy)),
                                      *recipe.stage3_overrides))]
            if trains_reward_model(cell.strategy):
                steps += _eval_step(study, out / "run" / "reward_model", out / "rm_eval", layout)
            jobs.append(Job(f"{backbone.name}.{cell.name}", out, steps, [rm_job.name], cell))
    return jobs


def trainer_prefix(study: StudyConfig, slurm: bool) -> list[str]:
    """What runs a trainer step: one process, torchrun on this node, or srun + torchrun with a c10d rendezvous on
    the job's first node (one torchrun per Slurm task; a task per node)."""
    cluster = study.cluster
    if cluster.nodes == 1:
        if cluster.gpus_per_node == 1 and not slurm:
            return ["python", "-m", "megatron_save"]
        return ["torchrun", "--standalone", f"--nproc-per-node={cluster.gpus_per_node}", "-m", "megatron_save"]
    return ["srun", "torchrun", '--nnodes="$SLURM_NTASKS"', f"--nproc-per-node={cluster.gpus_per_node}",
            "--rdzv-backend=c10d", f'--rdzv-endpoint="$head_node:{RDZV_PORT}"', '--rdzv-id="$SLURM_JOB_ID"',
            "-m", "megatron_save"]


def step_command(study: StudyConfig, step: Step, slurm: bool) -> str:
    """One step as a shell command line (srun's rendezvous variables left for the job's shell to expand)."""
    args = " ".join(shlex.quote(a) for a in step.argv)
    if step.kind == "trainer":
        return " ".join(trainer_prefix(study, slurm)) + " " + args
    if step.kind == "eval":
        processes = int(step.argv[step.argv.index("--tp") + 1]) * int(step.argv[step.argv.index("--pp") + 1])
        if processes > 1:
            return f"torchrun --standalone --nproc-per-node={processes} {args}"
    return f"python {args}"


def sbatch_script(study: StudyConfig, job: Job, repo: Path) -> str:
    """The job as an sbatch script: its resources, then each step, then the ``DONE`` marker."""
    cluster = study.cluster
    trains = any(s.kind == "trainer" for s in job.steps)
    nodes = cluster.nodes if trains else 1
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={job.name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={cluster.time}",
             f"#SBATCH --output={job.directory}/slurm-%j.out"]
    if cluster.request_gpus and trains:
        lines.append(f"#SBATCH --gpus-per-node={cluster.gpus_per_node}")
    if cluster.partition:
        lines.append(f"#SBATCH --partition={cluster.partition}")
    if cluster.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cluster.cpus_per_task}")
    lines += [f"#SBATCH {arg}" for arg in cluster.sbatch_args]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(repo))}", f"mkdir -p {shlex.quote(str(job.directory))}"]
    if nodes > 1:
        # sed reads the whole list: `head -n 1` could close the pipe early and fail the job under pipefail.
        lines.append('head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)')
    lines += [step_command(study, step, slurm=True) for step in job.steps]
    lines.append(f"touch {shlex.quote(str(job.directory / DONE))}")
    return "\n".join(lines) + "\n"
