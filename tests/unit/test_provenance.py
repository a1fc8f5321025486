"""The provenance stamp and tools/record.py: a measured artifact names its command, revision, dirty flag, date and
machine, and a failed measurement is recorded as failed."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

from megatron_save.utils.provenance import current_provenance


def test_stamp_names_revision_and_machine():
    stamp = current_provenance(command="python x.py")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert stamp.revision == head and len(head) == 40
    assert isinstance(stamp.dirty, bool)
    assert stamp.cpu_model and stamp.cpu_count >= 1
    assert stamp.as_text().splitlines()[0] == "command: python x.py"


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_an_untracked_file_makes_the_tree_dirty_and_an_ignored_one_does_not(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("outputs/\n")
    (repo / "bench.py").write_text("print(1)\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    assert not current_provenance(command="x", repo=repo).dirty
    (repo / "outputs").mkdir()
    (repo / "outputs" / "result.txt").write_text("ignored\n")
    assert not current_provenance(command="x", repo=repo).dirty
    (repo / "new_helper.py").write_text("untracked\n")
    assert current_provenance(command="x", repo=repo).dirty
    (repo / "new_helper.py").unlink()
    (repo / "bench.py").write_text("print(2)\n")
    assert current_provenance(command="x", repo=repo).dirty


def _record(tmp_path, *command):
    out = tmp_path / "record.txt"
    result = subprocess.run([sys.executable, "tools/record.py", "--out", str(out), "--", *command], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    return result, out.read_text()


def test_record_writes_output_under_the_stamp(tmp_path):
    result, text = _record(tmp_path, sys.executable, "-c", "print('ratio 1.5')")
    assert result.returncode == 0 and "ratio 1.5" in result.stdout
    header, body = text.split("\n\n", 1)
    fields = dict(line.split(": ", 1) for line in header.splitlines())
    assert set(fields) == {"command", "revision", "dirty", "date", "cpu_model", "cpu_count", "python", "wall_time_s",
                           "exit_status"}
    assert fields["exit_status"] == "0" and "ratio 1.5" in fields["command"]
    assert body == "ratio 1.5\n"


def test_record_keeps_a_failed_measurement_marked(tmp_path):
    result, text = _record(tmp_path, sys.executable, "-c", "import sys; print('half'); sys.exit(3)")
    assert result.returncode == 3
    assert "exit_status: 3" in text and "half" in text
