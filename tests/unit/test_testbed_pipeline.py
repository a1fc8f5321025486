"""The testbed pipeline's bookkeeping without running models: settings checks, output-directory guard, steps
that run once and start over after an interruption, and the progress read from a child's log."""

from __future__ import annotations

import pytest

from megatron_save.testbed.pipeline import (
    Steps,
    TestbedConfig,
    _progress_of,
    check_testbed_config,
    prepare_output_dir,
    torchrun,
)


def test_settings_are_checked_before_any_work():
    with pytest.raises(ValueError, match=r"unknown \['ppo'\]"):
        check_testbed_config(TestbedConfig(runs=["save", "ppo"]))
    with pytest.raises(ValueError, match="must not repeat"):
        check_testbed_config(TestbedConfig(seeds=[0, 0]))
    with pytest.raises(ValueError, match="at least one"):
        check_testbed_config(TestbedConfig(runs=[]))
    with pytest.raises(ValueError, match=r"comparisons: \['save', 'hl_bt'\]"):
        check_testbed_config(TestbedConfig(runs=["frozen", "save"], comparisons=[["save", "hl_bt"]]))
    with pytest.raises(ValueError, match="overlong_pair_share 1.5"):
        check_testbed_config(TestbedConfig(overlong_pair_share=1.5))
    with pytest.raises(ValueError, match="go together"):
        check_testbed_config(TestbedConfig(swept_runs=["save"]))
    with pytest.raises(ValueError, match=r"unknown \['sav'\]"):
        check_testbed_config(TestbedConfig(swept_runs=["sav"], rm_learning_rates=[1e-4]))
    check_testbed_config(TestbedConfig(runs=["frozen"], swept_runs=["save"], rm_learning_rates=[1e-4],
                                       comparisons=[["save@0.0001", "frozen"]]))


def test_output_dir_guard(tmp_path):
    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a testbed run"):
        prepare_output_dir(TestbedConfig(output_dir=str(stranger)))
    prepare_output_dir(TestbedConfig(output_dir=str(tmp_path / "mine")))
    prepare_output_dir(TestbedConfig(output_dir=str(tmp_path / "mine")))  # same settings: continue
    # Other seeds, runs or report settings continue the same comparison in parts ...
    prepare_output_dir(TestbedConfig(output_dir=str(tmp_path / "mine"), seeds=[4], runs=["save"],
                                     comparisons=[["save", "save"]], report_dir=str(tmp_path / "r")))
    # ... settings that change a seed's steps do not.
    with pytest.raises(FileExistsError, match="other settings"):
        prepare_output_dir(TestbedConfig(output_dir=str(tmp_path / "mine"), overlong_pair_share=0.1))


def test_steps_run_once_and_an_interrupted_step_starts_over(tmp_path):
    calls = []
    output = tmp_path / "out" / "stage"
    steps = Steps(TestbedConfig(output_dir=str(tmp_path / "out")), total=3)

    def interrupted():
        output.mkdir(parents=True)
        (output / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        steps.run("seed_0/stage", action=interrupted, outputs=(output,))
    assert (output / "partial").exists()

    def complete():
        calls.append(sorted(p.name for p in output.iterdir()) if output.exists() else [])
        output.mkdir(parents=True, exist_ok=True)

    steps.run("seed_0/stage", action=complete, outputs=(output,))
    steps.run("seed_0/stage", action=complete, outputs=(output,))
    steps.close()
    assert calls == [[]]  # ran once, after the partial output was removed


def test_wall_time_sums_the_timed_steps_of_the_report_seeds(tmp_path):
    import json
    import os

    from megatron_save.testbed.pipeline import wall_time

    done = tmp_path / "done"
    done.mkdir()
    for name, seconds, finished in (("seed_0__sft", 10.0, 100), ("seed_0__rl_save@0.001", 30.0, 400),
                                    ("seed_0__stage1", None, 50), ("seed_1__sft", 99.0, 9000)):
        (done / name).write_text("" if seconds is None else json.dumps({"seconds": seconds}))
        os.utime(done / name, (finished, finished))
    assert wall_time(TestbedConfig(output_dir=str(tmp_path), seeds=[0])) == {
        "steps": 3, "steps_timed": 2, "seconds_timed": 40.0, "seconds_timed_rl_runs": 30.0,
        "span_seconds_first_to_last_finished_step": 350.0}
    steps = Steps(TestbedConfig(output_dir=str(tmp_path)), total=1)
    steps.run("seed_2/data", action=lambda: None)
    steps.close()
    assert json.loads((done / "seed_2__data").read_text())["seconds"] >= 0


def test_progress_of_reads_the_last_bar_of_a_child_log(tmp_path):
    log = tmp_path / "child.log"
    log.write_text("[12:00 x] hello\nstage 3 (save):  10%|#         | 3/30 [00:01<00:09]\r"
                   "stage 3 (save):  13%|#         | 4/30 [00:02<00:09]\r")
    assert _progress_of(log) == "stage 3 (save) 4/30"
    log.write_text("no bar yet\n")
    assert _progress_of(log) == ""


def test_children_run_under_this_interpreter():
    command = torchrun(TestbedConfig(nproc=2), "sft", "a.yaml")
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in command
    assert command[-4:] == ["-m", "megatron_save", "sft", "a.yaml"]
