"""Re-initialising torch.distributed and Megatron's groups in one process (what world_of_one, conversions and
in-process runs each do) must not pile up process groups: every gloo group holds three OS threads, and a
suite of such tests once ended holding thousands of them."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.config import ParallelConfig
from megatron_save.distributed import init_distributed, set_model_parallel, shutdown_distributed
from megatron_save.testing import save_tiny_hf_model

STATUS = Path("/proc/self/status")
SLACK = 8
"""Threads the process may gain between two measurements for reasons other than process groups (a lazily
started pool); well under the 3 x 17 threads that one leaked set of Megatron groups holds on gloo."""

pytestmark = pytest.mark.skipif(not STATUS.exists(), reason="counts threads through /proc")


def _threads() -> int:
    """This process's OS threads, C++ ones included (threading.active_count() sees only Python's)."""
    return int(re.search(r"^Threads:\s+(\d+)", STATUS.read_text(), re.MULTILINE).group(1))


def _groups() -> int:
    """Live process groups, the default one included."""
    return len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0


def _reinitialise() -> None:
    init_distributed(ParallelConfig())
    set_model_parallel(ParallelConfig(seed=5))
    # Megatron's own teardown only forgets most of its groups; the next set-up must still destroy them.
    parallel_state.destroy_model_parallel()
    set_model_parallel(ParallelConfig())


def test_reinitialising_does_not_pile_up_groups_or_threads():
    # The first round replaces the groups that were live before; their threads end when the last object holding
    # them (a model of an earlier test, in a reference cycle) is collected, so the baseline is taken after it.
    _reinitialise()
    gc.collect()
    groups, threads = _groups(), _threads()
    for _ in range(4):
        _reinitialise()
    gc.collect()
    assert _groups() == groups
    assert _threads() <= threads + SLACK, f"{threads} threads after one re-initialisation, {_threads()} after five"


def test_shutdown_frees_every_group_and_a_new_world_starts_the_same():
    init_distributed(ParallelConfig())
    groups, threads = _groups(), _threads()
    for _ in range(3):
        shutdown_distributed()
        assert _groups() == 0 and _threads() < threads
        init_distributed(ParallelConfig())
        assert _groups() == groups
    assert _threads() <= threads + SLACK


def test_in_process_conversions_keep_the_thread_count_bounded(tmp_path):
    hf_dir = save_tiny_hf_model("llama", tmp_path / "hf", seed=7)
    convert_hf_to_megatron(hf_dir, tmp_path / "mg0")
    threads = _threads()
    for run in range(1, 3):
        convert_hf_to_megatron(hf_dir, tmp_path / f"mg{run}")
    assert _threads() <= threads + SLACK, f"{threads} threads after one conversion, {_threads()} after three"
