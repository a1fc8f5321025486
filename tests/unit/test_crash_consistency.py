"""Crash consistency of run files: histories with a torn last line, the run lock, stale checkpoint staging."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_save.utils.files import LOCK_FILE, RunLock, atomic_write_text
from megatron_save.utils.metrics import truncate_history


def test_truncation_drops_a_torn_last_line_and_refuses_a_damaged_middle(tmp_path, world_of_one):
    history = tmp_path / "metrics.jsonl"
    history.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    truncate_history(history, 2)
    assert history.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not list(tmp_path.glob(".*.tmp"))  # rewritten through a temporary file, renamed over it
    history.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record with a step"):
        truncate_history(history, 2)


def test_atomic_write_replaces_the_content(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "step_000001\n")
    atomic_write_text(target, "step_000002\n")
    assert target.read_text() == "step_000002\n" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_the_run_lock_refuses_a_second_launch_and_takes_over_a_dead_ones(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder == {"host": socket.gethostname(), "pid": os.getpid()}
        with pytest.raises(RuntimeError, match=rf"in use by another launch .*pid {os.getpid()}"):
            RunLock(tmp_path / "run").__enter__()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released at the end

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(),
                                                          "pid": int(dead.stdout)}))
    with RunLock(tmp_path / "run") as lock:  # the holder is gone: taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"host": "another-host", "pid": 1}))
    with pytest.raises(RuntimeError, match="host another-host, pid 1"):  # cannot tell from here: refused
        RunLock(tmp_path / "run").__enter__()


def test_the_run_lock_is_taken_by_the_first_rank_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with RunLock(tmp_path / "run"):
        assert not (tmp_path / "run").exists()


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="output_dir .*file is a file"):
        RunLock(tmp_path / "file").__enter__()
