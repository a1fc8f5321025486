"""Which megatron-core wrote a checkpoint: recorded at save, compared at load.

dist_checkpointing writes what its release reads: a checkpoint of 0.19 does not load on 0.16.1 (0.19 keeps the
common state inside the torch_dist files and writes no ``common.pt``; 0.16.1 fails with "'str' object has no
attribute 'iterdir'"), while 0.19 loads 0.16.1's. So a load refuses a checkpoint of a newer release than the
installed one up front, naming both. The recorded version is data, compared as such; code that differs between
releases detects the feature it needs instead.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import InvalidVersion, Version


def installed_megatron_core() -> str:
    """The installed megatron-core's version (the distribution's, without the git suffix that
    ``megatron.core.__version__`` gains from the working directory)."""
    try:
        return version("megatron-core")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH
        from megatron.core.package_info import __shortversion__

        return __shortversion__


def _release(text: str, source: str | Path) -> tuple[int, int]:
    """(major, minor) of a version string: the format of dist_checkpointing changes between releases, not between
    their patch versions."""
    try:
        release = Version(text).release
    except InvalidVersion:
        raise ValueError(f"{source}: megatron_core {text!r} is not a version") from None
    return (release + (0,))[:2]


def refuse_newer_megatron_core(source: str | Path, written_by: str | None) -> None:
    """Raises ValueError naming both versions when the megatron-core that wrote ``source`` (``written_by``; None for
    checkpoints that predate the record, which load as before) is a newer release than the installed one."""
    if written_by is None:
        return
    installed = installed_megatron_core()
    if _release(written_by, source) > _release(installed, "the installed megatron-core"):
        raise ValueError(f"{source} was written by megatron-core {written_by}, this environment has megatron-core "
                         f"{installed}: an older release cannot read a newer one's dist_checkpointing files. Load "
                         f"it with megatron-core>={written_by}")
