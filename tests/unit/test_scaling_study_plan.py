"""The scaling study's planning without running anything: the study file's checks, its jobs and their commands,
the sbatch scripts (single- and multi-node), the memory planner's layout choice, the paired SAVE - baseline
interval, and run with launcher slurm where sbatch is absent."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

from helpers import REPO
from megatron_save.planning.study import (BackboneSpec, ClusterSpec, RecipeSpec, StudyConfig, jobs_of, load_study,
                                          sbatch_script, step_command, study_problems)
from megatron_save.planning.study import Layout

sys.path.insert(0, str(REPO / "tools"))
scaling_study = importlib.import_module("scaling_study")

SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4}


def small_study(tmp_path, **changes) -> StudyConfig:
    study = StudyConfig(output_dir=str(tmp_path / "out"),
                        backbones=[BackboneSpec(name="a", shape=SHAPE), BackboneSpec(name="b", hf="org/model")],
                        recipe=RecipeSpec(strategies=["frozen", "save"], seeds=[1, 2], benchmark_data="bench.json"))
    for key, value in changes.items():
        setattr(study, key, value)
    return study


def test_study_file_problems_are_named(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("output_dir: out\nlauncher: pbs\nbackbones:\n  - {name: x, hf: a, shape: {hidden_size: 8}}\n"
                    "  - {name: x/y}\ncluster: {nodes: 2}\nrecipe: {stages: [stage2, stage1, stage3]}\n")
    with pytest.raises(ValueError) as error:
        load_study(path)
    message = str(error.value)
    for part in ("study.yaml", "launcher='pbs'", "backbones[0] (x): give exactly one of hf, shape",
                 "backbones[1].name='x/y'", "recipe.stages="):
        assert part in message, message
    with pytest.raises(ValueError) as error:
        load_study(path, ["launcher=local", "backbones=[{name: x, hf: a}]", "recipe.stages=[stage3]",
                          "recipe.baseline=grpo"])
    assert "cluster.nodes=2 must be 1" in str(error.value) and "recipe.baseline='grpo'" in str(error.value)
    assert study_problems(small_study(tmp_path)) == []


def test_jobs_chain_prepare_rm_and_cells(tmp_path):
    study = small_study(tmp_path)
    jobs = jobs_of(study, {"a": Layout(tp=2), "b": Layout(pp=2, distributed_optimizer=True)},
                   scaling_study.trains_reward_model)
    names = [j.name for j in jobs]
    assert names == ["a.prepare", "a.rm", "a.frozen_seed1", "a.frozen_seed2", "a.save_seed1", "a.save_seed2",
                     "b.prepare", "b.rm", "b.frozen_seed1", "b.frozen_seed2", "b.save_seed1", "b.save_seed2"]
    by = {j.name: j for j in jobs}
    assert by["a.rm"].after == ["a.prepare"] and by["b.save_seed2"].after == ["b.rm"]
    out = Path(study.output_dir)
    # One process makes a shape backbone (or takes the HF one) and converts it twice.
    assert by["a.prepare"].steps[0].argv == (
        "tools/scaling_study.py", "make-backbone", "--out", str(out / "a" / "models"), "--family", "llama",
        "--set=hidden_size=64", "--set=intermediate_size=96", "--set=num_hidden_layers=4")
    assert by["b.prepare"].steps[0].argv[-2:] == ("--hf", "org/model")
    stage3 = by["b.save_seed2"].steps[0].argv
    assert stage3[0] == "stage3" and f"reward.checkpoint={out / 'b' / 'stage2'}" in stage3
    assert {"reward.strategy=save", "seed=2", "parallel.pipeline_model_parallel_size=2",
            "policy.optim.use_distributed_optimizer=true", "reward.optim.use_distributed_optimizer=true"} <= set(stage3)
    assert "optim.use_distributed_optimizer=true" in by["b.rm"].steps[0].argv
    # The frozen RM is stage 2's, scored once in the rm job; SAVE's trained RM is scored in its cell.
    assert [s.kind for s in by["a.frozen_seed1"].steps] == ["trainer"]
    assert [s.kind for s in by["a.save_seed1"].steps] == ["trainer", "eval"]
    assert str(out / "a" / "save_seed1" / "run" / "reward_model") in by["a.save_seed1"].steps[1].argv
    assert step_command(study, by["a.rm"].steps[-1], slurm=False).startswith("torchrun --standalone "
                                                                             "--nproc-per-node=2 tools/eval_rm.py")


def test_sbatch_scripts_single_and_multi_node(tmp_path):
    study = small_study(tmp_path, cluster=ClusterSpec(nodes=1, gpus_per_node=4, partition="gpu"))
    jobs = {j.name: j for j in jobs_of(study, {"a": Layout(), "b": Layout()}, scaling_study.trains_reward_model)}
    single = sbatch_script(study, jobs["a.save_seed1"], REPO)
    assert "#SBATCH --nodes=1" in single and "#SBATCH --gpus-per-node=4" in single
    assert "#SBATCH --partition=gpu" in single and "srun" not in single
    assert "torchrun --standalone --nproc-per-node=4 -m megatron_save stage3 " in single
    assert single.rstrip().endswith(f"touch {Path(study.output_dir) / 'a' / 'save_seed1' / 'DONE'}")
    # Conversion needs no GPU and one node.
    prepare = sbatch_script(study, jobs["a.prepare"], REPO)
    assert "--gpus-per-node" not in prepare and "#SBATCH --nodes=1" in prepare

    study.cluster = ClusterSpec(nodes=4, gpus_per_node=8, request_gpus=False, sbatch_args=["--exclusive"])
    multi = sbatch_script(study, jobs["a.save_seed1"], REPO)
    assert "#SBATCH --nodes=4" in multi and "#SBATCH --ntasks-per-node=1" in multi and "--gpus-per-node" not in multi
    assert "#SBATCH --exclusive" in multi
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in multi
    assert ('srun torchrun --nnodes="$SLURM_NTASKS" --nproc-per-node=8 --rdzv-backend=c10d '
            '--rdzv-endpoint="$head_node:29500" --rdzv-id="$SLURM_JOB_ID" -m megatron_save stage3 ') in multi
    # The benchmark runs as one process group on the first node, not under srun.
    assert any(line.startswith("python tools/eval_rm.py") for line in multi.splitlines())


def test_planner_adapter_picks_the_smallest_layout_that_fits(tmp_path):
    from megatron_save.planning import architecture_from_hf, parse_bytes
    from megatron_save.testing import tiny_hf_config

    config = tiny_hf_config("llama", **SHAPE)
    policy = architecture_from_hf(config, reward_model=False)
    reward = architecture_from_hf(config, reward_model=True)
    study = small_study(tmp_path)
    roomy = scaling_study.fit_layout(policy, reward, 4, parse_bytes("80GB"), study)
    assert roomy.fits and roomy.layout == Layout() and roomy.planned_bytes["save"] > roomy.planned_bytes["frozen"]
    # Between what TP 1 needs and what TP 2 needs: TP 2 is chosen.
    from megatron_save.planning import MemoryLayout, plan_memory

    base = MemoryLayout(micro_batch=4, reward_micro_batch=16, value_head=True)
    tp1, tp2 = (plan_memory(policy, reward, MemoryLayout(**{**base.__dict__, "tp": tp, "dp": 4 // tp})).peak
                for tp in (1, 2))
    assert tp2 < tp1
    # Below what TP 1 needs as it is: the cheapest fitting settings (selective recompute or a token budget comes
    # before a larger model-parallel size), applied to the stage-3 launch.
    squeezed = scaling_study.fit_layout(policy, reward, 4, tp1 - 1, study)
    assert squeezed.fits and max(squeezed.planned_bytes.values()) <= tp1 - 1 and squeezed.layout.stage3
    assert set(squeezed.layout.stage3) <= set(squeezed.layout.overrides("stage3"))
    hopeless = scaling_study.fit_layout(policy, reward, 4, 1000, study)
    assert not hopeless.fits  # the least it can need, marked
    assert {"offload.optimizer=true", "policy.recompute.granularity=full"} <= set(hopeless.layout.stage3)


def test_reward_model_settings_reach_only_the_cells_that_train_it(tmp_path):
    """A planned reward.* setting (recompute, token budget) goes to save's stage 3, not to frozen's, whose
    untrained reward model would refuse it; verifier_reward trains none either, and writes no RM to evaluate."""
    study = small_study(tmp_path)
    layout = Layout(stage3=["reward.recompute.granularity=selective", "offload.optimizer=true"])
    jobs = jobs_of(study, {"a": layout, "b": layout}, scaling_study.trains_reward_model)
    stage3 = {j.cell.strategy: j.steps[0].argv for j in jobs if j.cell is not None}
    assert "reward.recompute.granularity=selective" in stage3["save"]
    assert "reward.recompute.granularity=selective" not in stage3["frozen"]
    assert "offload.optimizer=true" in stage3["frozen"]
    assert [scaling_study.trains_reward_model(s) for s in ("save", "frozen", "verifier_reward", "prime")] == [
        True, False, False, False]


def test_paired_difference_interval():
    d = scaling_study.paired_difference([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) x sd / sqrt(n)
    assert (d["mean"], d["seeds"]) == (2.0, 3)
    assert d["low"] == pytest.approx(2.0 - half) and d["high"] == pytest.approx(2.0 + half)
    assert scaling_study.paired_difference([0.5])["low"] is None


def test_slurm_run_without_sbatch_writes_the_scripts(tmp_path, monkeypatch, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nlauncher: slurm\n"
                    f"backbones: [{{name: a, shape: {json.dumps(SHAPE)}}}]\n"
                    "recipe: {strategies: [save]}\n")
    monkeypatch.setattr(scaling_study.shutil, "which", lambda name: None)
    assert scaling_study.main(["run", str(path)]) == 0
    assert "sbatch is not on PATH: wrote the scripts" in capsys.readouterr().out
    scripts = sorted(p.name for p in (tmp_path / "out" / "scripts").iterdir())
    assert scripts == ["a.prepare.sbatch", "a.rm.sbatch", "a.save_seed1.sbatch"]
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["backbones"]["a"]["fits"] and [j["after"] for j in plan["jobs"]] == [[], ["a.prepare"], ["a.rm"]]


def test_example_study_plans(tmp_path, capsys):
    """examples/scaling/study_qwen3.yaml plans from its committed configs: the dense rungs fit 2 x 8 x 80 GB."""
    assert scaling_study.main(["plan", str(REPO / "examples/scaling/study_qwen3.yaml"),
                               f"output_dir={tmp_path}"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())["backbones"]
    assert plan["qwen3-4b"]["fits"] and plan["llama3.1-8b"]["fits"] and not plan["qwen3-30b-a3b"]["fits"]
    assert plan["qwen3-30b-a3b"]["params_active"] < plan["qwen3-30b-a3b"]["params_total"] / 5
    assert "srun torchrun" in capsys.readouterr().out
