"""The ``megatron-save`` console command is ``python -m megatron_save``: the same commands, the same usage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_save.__main__ import COMMANDS


def _console_command() -> Path:
    command = Path(sys.executable).parent / "megatron-save"
    if not command.exists():
        pytest.fail(f"{command} is missing: install the package (pip install -e .) to get the console command")
    return command


@pytest.mark.parametrize("launcher", ["console", "module"])
def test_both_launchers_list_the_commands(launcher):
    cmd = [str(_console_command())] if launcher == "console" else [sys.executable, "-m", "megatron_save"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert f"commands: {', '.join(COMMANDS)}" in result.stderr


def test_the_console_command_reaches_the_trainer():
    """``megatron-save stage3`` without a config stops at stage 3's own usage line (it dispatched)."""
    result = subprocess.run([str(_console_command()), "stage3"], capture_output=True, text=True, timeout=900)
    assert result.returncode != 0
    assert "-m megatron_save stage3 CONFIG.yaml" in result.stderr, result.stderr[-2000:]
