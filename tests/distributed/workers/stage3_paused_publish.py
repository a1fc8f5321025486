"""Stage 3 as ``python -m megatron_save stage3 ARGS`` that stops inside a directory's publication: ``python -m workers
stage3_paused_publish PATTERN MARKER ARGS...``. When rank 0 starts publishing a staging directory whose name
matches PATTERN (fnmatch; everything written, not yet renamed), it writes MARKER and waits to be killed, so that a
fault test kills the run at that point every time instead of racing a write that lasts milliseconds."""

from __future__ import annotations

import fnmatch
import sys
import time
from pathlib import Path

import megatron_save.utils.files as files
from megatron_save.__main__ import main as megatron_save_main


def main() -> None:
    pattern, marker, *args = sys.argv[1:]
    sync_tree = files.fsync_tree

    def pausing_fsync_tree(root: Path) -> None:
        if fnmatch.fnmatch(Path(root).name, pattern):
            Path(marker).write_text(f"{root}\n")
            time.sleep(3600)
        sync_tree(root)

    files.fsync_tree = pausing_fsync_tree
    megatron_save_main(["stage3", *args])
