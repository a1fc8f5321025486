"""The command line as a user runs it: the ``megatron-save`` console command is ``python -m megatron_save`` (the
same commands, the same usage); ``COMMAND --help`` lists every setting, ``--print-config`` the merged config, and
a bad file, setting or value is one line with the closest keys and exit status 2 (``MEGATRON_SAVE_DEBUG=1``: the
traceback). Each subprocess imports torch and Megatron (seconds of CPU), so the trainer's cases are few and the
rest run in-process through the same ``main``; every tool's ``--help`` runs its script in-process."""

from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_save.__main__ import COMMANDS, SETTINGS, main
from megatron_save.config.describe import settings_of

REPO = Path(__file__).resolve().parents[2]
STAGE3_YAML = REPO / "examples" / "paper" / "stage3_save.yaml"
FALLBACK_LINE = "not installed: megatron-core uses its PyTorch fallbacks (expected on CPU)"


def _console_command() -> Path:
    command = Path(sys.executable).parent / "megatron-save"
    if not command.exists():
        pytest.fail(f"{command} is missing: install the package (pip install -e .) to get the console command")
    return command


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(_console_command()), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env}, cwd=REPO)


def _messages(stderr: str) -> list[str]:
    """stderr without the rank-0 logger's lines (``[HH:MM:SS megatron_save...] ...``)."""
    return [line for line in stderr.splitlines() if not line.startswith("[") or " megatron_save" not in line]


@pytest.mark.parametrize("launcher", ["console", "module"])
def test_both_launchers_list_the_commands(launcher):
    cmd = [str(_console_command())] if launcher == "console" else [sys.executable, "-m", "megatron_save"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"commands: {', '.join(COMMANDS)}" in result.stderr


def test_help_lists_every_setting_without_warnings():
    """``megatron-save stage3 --help`` (it used to read --help as a config file): exit 0, each setting with its
    type, default and docstring; megatron-core's five TE / Apex warnings are one info line (none with TE)."""
    result = _run("stage3", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: megatron-save stage3 CONFIG.yaml" in result.stdout
    assert "  reward.strategy (str, default 'save')\n      A row of trainers/strategies.py" in result.stdout
    assert "  policy.optim.lr (float, default 2e-06)" in result.stdout  # the nested default its factory builds
    assert "  output_dir (str, default (required))" in result.stdout
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    expected = int(importlib.util.find_spec("transformer_engine") is None or importlib.util.find_spec("apex") is None)
    assert result.stderr.count(FALLBACK_LINE) == expected, result.stderr


def test_a_mistyped_setting_is_one_line_with_the_closest_key():
    result = _run("stage3", str(STAGE3_YAML), "reward.stratgy=save")
    assert result.returncode == 2
    assert _messages(result.stderr) == ["megatron-save stage3: error: override 'reward.stratgy=save': unknown "
                                        "setting reward.stratgy (did you mean reward.strategy?)"], result.stderr


def test_print_config_merges_the_files_and_overrides():
    result = _run("stage3", str(STAGE3_YAML), "--print-config", "rollout.sampling.n=3", "reward.strategy=hl_bt")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["rollout"]["sampling"]["n"] == 3 and printed["reward"]["strategy"] == "hl_bt"
    assert printed["output_dir"] == yaml.safe_load(STAGE3_YAML.read_text())["output_dir"]  # from the file
    assert printed["policy"]["kl_coef"] == 0.04  # a default


def test_debug_shows_the_traceback():
    result = _run("stage3", "no_such.yaml", MEGATRON_SAVE_DEBUG="1")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError: no_such.yaml: no such config file" in result.stderr


def _error_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    assert stop.value.code == 2
    lines = _messages(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_files_settings_and_values_are_one_line(capsys, tmp_path, monkeypatch):
    """The same ``main`` in-process: each mistake is named in one line, exit 2."""
    monkeypatch.delenv("MEGATRON_SAVE_DEBUG", raising=False)
    bad_yaml, nested = tmp_path / "bad.yaml", tmp_path / "nested.yaml"
    bad_yaml.write_text("reward:\n  strategy: [save\n")
    nested.write_text("policy:\n  optim:\n    lrr: 1.0\n")
    stage3 = str(STAGE3_YAML)
    assert _error_of(capsys, "stage3", "no_such.yaml").endswith("error: no_such.yaml: no such config file")
    assert "bad.yaml: not valid YAML (line 3:" in _error_of(capsys, "stage3", str(bad_yaml))
    assert _error_of(capsys, "stage3", str(nested)).endswith(
        "nested.yaml: unknown setting policy.optim.lrr (did you mean policy.optim.lr?)")
    assert _error_of(capsys, "stage3", stage3, "reward.no_such=1").endswith(
        "unknown setting reward.no_such (see --help for the settings)")
    assert _error_of(capsys, "stage3", stage3, "policy.kl_coeff=0").endswith("(did you mean policy.kl_coef?)")
    assert "could not be converted to Float (setting reward.initial_margin)" in _error_of(
        capsys, "stage3", stage3, "reward.initial_margin=abc")
    assert _error_of(capsys, "stage3", stage3, "reward.strategy=sav").endswith(
        "reward.strategy='sav' is not one of " + ", ".join(__import__("megatron_save.trainers.strategies",
                                                                      fromlist=["STRATEGIES"]).STRATEGIES))
    assert _error_of(capsys, "stage3", stage3, "--resume").endswith("unknown option --resume (options: --help, "
                                                                    "--print-config; settings are key=value)")
    partial = tmp_path / "partial.yaml"
    partial.write_text("checkpoint: ckpt\n")
    assert _error_of(capsys, "stage1", str(partial)).endswith(
        "missing required setting output_dir (set it in a YAML file or as output_dir=...)")
    assert _error_of(capsys, "stage4").endswith(f"unknown command 'stage4' (did you mean stage3?); commands: "
                                                f"{', '.join(COMMANDS)}")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_a_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:"), out[:500]
    if command in SETTINGS:  # every setting of the config dataclass the command loads
        schema = getattr(importlib.import_module(COMMANDS[command]), SETTINGS[command])
        assert [line.split(" (")[0].strip() for line in out.split("settings:\n", 1)[1].splitlines()
                if line.startswith("  ") and not line.startswith("      ")] == [s.key for s in settings_of(schema)]
    else:
        assert "options:" in out


@pytest.mark.parametrize("tool", sorted(p.name for p in (REPO / "tools").glob("*.py")))
def test_every_tool_has_a_help(tool, capsys, monkeypatch):
    """``python tools/X.py --help`` (the script run as __main__, in-process): usage and exit 0."""
    monkeypatch.setattr(sys, "argv", [f"tools/{tool}", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "tools" / tool), run_name="__main__")
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_only_megatron_cores_fallback_warnings_are_silenced():
    import warnings

    from megatron_save import silence_fallback_warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        silence_fallback_warnings()
        for message, module in (("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends"),
                                ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                                 "megatron.core.optimizer"),
                                ("Apex is not installed. Falling back to Torch Norm", "someone_else.module"),
                                ("Some other warning", "megatron.core.optimizer")):
            warnings.warn_explicit(message, UserWarning, "x.py", 1, module=module)
    assert [str(w.message) for w in shown] == ["Apex is not installed. Falling back to Torch Norm", "Some other warning"]


def test_the_testbed_tool_names_a_mistyped_setting(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tools/gold_testbed.py", "seed=1"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "tools" / "gold_testbed.py"), run_name="__main__")
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: override 'seed=1': unknown setting seed (did you mean seeds?)")
