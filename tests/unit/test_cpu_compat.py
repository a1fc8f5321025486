"""The CPU compatibility layer redirects CUDA uses on CPU and does nothing when CUDA is present (checked with CUDA
faked here, and for real on a GPU machine, where the redirection tests skip)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_save.distributed import cpu_compat

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU compatibility layer installs only without "
                              "CUDA (test_is_a_no_op_with_real_cuda checks it here)")


@cpu_only
def test_redirects_cuda_uses_to_cpu():
    assert cpu_compat.install()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end)


@cpu_only
def test_cuda_rng_is_the_cpu_generator():
    cpu_compat.install()
    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state()
    first = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_is_a_no_op_when_cuda_is_available():
    code = (
        "import torch; torch.cuda.is_available = lambda: True; original = torch.cuda.current_device\n"
        "from megatron_save.distributed import cpu_compat\n"
        "assert cpu_compat.install() is False and not cpu_compat.is_active()\n"
        "assert torch.cuda.current_device is original and torch.Tensor.cuda is torch._C.TensorBase.cuda\n"
        "assert torch.zeros(1, device='meta').device.type == 'meta'\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)


@pytest.mark.gpu
def test_is_a_no_op_with_real_cuda():
    original = torch.cuda.current_device
    assert cpu_compat.install() is False and not cpu_compat.is_active()
    assert torch.cuda.current_device is original
    assert torch.zeros(2, device="cuda").device.type == "cuda"
