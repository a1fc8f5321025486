"""Where a measured number came from: the command, the code revision (and whether the tree had uncommitted
changes), the date and the machine. Every artifact under ``docs/`` that README quotes carries this stamp."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Provenance:
    """The stamp of one measurement."""

    command: str
    """The command line that produced the artifact, as typed."""
    revision: str
    """``git rev-parse HEAD`` of the code that ran ("unknown" outside a git checkout)."""
    dirty: bool
    """True when tracked files differed from that revision or the checkout held untracked files that git does not
    ignore (a new script, say): the numbers then belong to no commit exactly."""
    date: str
    """UTC time of the stamp, ISO 8601."""
    cpu_model: str
    """The processor's model name, from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    cpu_count: int
    """Cores this process may run on."""
    python: str
    """The interpreter's version."""

    def as_dict(self) -> dict:
        return asdict(self)

    def as_text(self) -> str:
        """The stamp as ``key: value`` lines, for the head of a text report."""
        return "\n".join(f"{key}: {value}" for key, value in asdict(self).items())


def _git(*args: str, repo: Path = REPO) -> str | None:
    try:
        # Not a verdict: a hang guard for a git that waits on a lock; 120 s is far beyond a status on a slow disk.
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def cpu_model() -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), or what the platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def current_provenance(command: str | None = None, repo: Path = REPO) -> Provenance:
    """The stamp of this process: its command line (or ``command``), the revision of the checkout ``repo`` (this
    package's own by default) and its dirty flag (changed tracked files, or untracked ones git does not ignore)."""
    revision = _git("rev-parse", "HEAD", repo=repo)
    status = _git("status", "--porcelain", "--untracked-files=all", repo=repo)
    return Provenance(
        command=command if command is not None else " ".join([Path(sys.executable).name, *sys.argv]),
        revision=revision or "unknown",
        dirty=bool(status) if status is not None else True,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu_model=cpu_model(),
        cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        python=platform.python_version(),
    )
