"""The one CPU compatibility layer of megatron-save.

Megatron-Core 0.16 hard-codes CUDA in a handful of places that sit on the code paths we need on a CPU-only
machine (tensor-parallel layers, pipeline schedules and p2p, DDP buffers, the optimizer, dist_checkpointing).
``install()`` redirects exactly those uses to the CPU so that the real Megatron-Core TP/PP code runs on gloo in
tests and CI. It is the only place in the package that patches third-party behaviour, and it does nothing when
CUDA is available.

Each redirection names the Megatron-Core 0.16.1 call sites it serves (0.19.2 has the same ones, at other line
numbers). A Megatron-Core attribute it replaces must exist: a release that renamed one fails here, naming it, instead
of running with the redirection silently missing.

* ``device=`` arguments that name CUDA (``"cuda"``, ``torch.device("cuda")`` or a device index) are rewritten
  to ``"cpu"`` by a global :class:`torch.overrides.TorchFunctionMode`. Serves the literal ``device="cuda"`` in
  transformer/utils.py:35, pipeline_parallel/schedules.py:596,2138, optimizer/clip_grads.py:103,
  optimizer/optimizer.py:481,485,907, utils.py:1207, and every ``device=torch.cuda.current_device()``.
  A torch-function mode is used instead of wrapping ``torch.zeros`` and friends because wrappers broke
  transformers' RoPE buffers.
* The autograd engine runs backward functions without torch-function modes, so the one such call that names a
  CUDA device inside a backward, ``Tensor.new_empty(..., device=torch.cuda.current_device())`` of the MoE
  dispatcher's all-to-all (tensor_parallel/mappings.py:439, reached from its backward at :458), goes through a
  ``Tensor.new_empty`` that puts a CUDA device argument on the CPU.
* Activation recompute runs a layer's (or its core attention's) forward again inside the backward of Megatron's
  ``CheckpointFunction`` (tensor_parallel/random.py:535-570), where no torch-function mode is active: that
  backward runs under the mode above, so the recomputed forward meets the same redirections as the first one
  (the causal mask's ``device="cuda"``, transformer/utils.py:35).
* ``torch.cuda.current_device`` returns device index 0, which the mode above maps to the CPU:
  rotary_pos_embedding.py:162, p2p_communication.py:313,321, utils.py:631, tensor_parallel/mappings.py:91,
  transformer/attention.py:430, param_and_grad_buffer.py:800,806, distrib_optimizer.py:1077,
  dist_checkpointing/strategies/state_dict_saver.py:252, text_generation_controller.py.
* ``torch.cuda.synchronize`` is a no-op: p2p_communication.py:398,
  dist_checkpointing/strategies/filesystem_async.py:230.
* ``torch.cuda.Event`` is a wall-clock event: timers and p2p.
* ``torch.cuda.Stream``, ``current_stream`` and the ``stream`` context are one host stream that waits for
  nothing (CPU work is synchronous): the MoE all-to-all token dispatcher's device-to-host side stream,
  transformer/moe/token_dispatcher.py:445,871-895.
* The all-to-all dispatcher's split sizes pass through ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, which
  converts only CUDA tensors (moe_utils.py:1093); CPU tensors are converted too, since ``all_to_all_single``
  takes a sequence of sizes and refuses a tensor: token_dispatcher.py:876-895.
* ``Tensor.cuda()`` returns the tensor: distrib_optimizer.py:1089.
* ``Tensor.type()`` without arguments reports ``torch.cuda.*`` names for CPU tensors, because the optimizer
  asserts on them: clip_grads.py:167, distrib_optimizer.py:361,420,582, optimizer.py:671,690.
* ``torch.Generator`` made for a CUDA device (or a device index) is made for the CPU: the sampling generator of
  the inference text_generation_controller.py:75 (the Megatron-Core rollout engine).
* The inference pipeline broadcasts assert their tensors are on CUDA (inference/communication_utils.py:28-31,
  called at :74 and :156): the check keeps its "not None" half.
* Without Transformer Engine, megatron-core 0.16.1's MoE router reads the name ``te_general_gemm`` that only
  its TE import defines (transformer/moe/moe_utils.py:1192,1225: a NameError); where the module lacks the name
  (0.17+ defines it as None itself) it is defined as None, which selects the plain ``torch.mm`` path written
  beside it. (On a GPU, MoE models need Transformer Engine for the same reason: ``megatron_save.models.gpt_config``
  says so.)
* The CUDA RNG state is the CPU default generator, so ``model_parallel_cuda_manual_seed`` and the RNG
  tracker's ``fork()`` work: tensor_parallel/random.py:41-110 (``_get/_set_cuda_rng_state``), 235-277, 422.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def _names_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device argument is a CUDA device index.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites CUDA ``device`` arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        # Tensor.to("cuda") / Tensor.to(0) / Tensor.to(torch.device("cuda"), dtype)
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _is_present(tensor: torch.Tensor | None) -> None:
    """Stand-in for the inference communication's CUDA check: the tensor must exist (on any device)."""
    assert tensor is not None


class _CpuGenerator(torch.Generator):
    """``torch.Generator`` that puts a generator asked for on a CUDA device on the CPU instead."""

    def __new__(cls, device: Any = "cpu"):
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return super().__new__(cls, "cpu" if target.type == "cuda" else target)


class _WallClockEvent:
    """Stand-in for ``torch.cuda.Event``: records wall-clock time."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: "_WallClockEvent") -> float:
        return (end_event._time - self._time) * 1000.0


class _HostStream:
    """Stand-in for ``torch.cuda.Stream``: work on the CPU is already ordered, so waiting is a no-op."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        pass

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event: _WallClockEvent | None = None) -> _WallClockEvent:
        event = event or _WallClockEvent()
        event.record(self)
        return event


_HOST_STREAM = _HostStream()


def _host_tensor(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """Stand-in for the MoE dispatcher's device-to-host copy: every tensor is on the host; ``as_numpy`` still
    converts."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all itself.
    torch.default_generator.manual_seed(int(seed))


def _replace(module: Any, name: str, value: Any) -> None:
    """Sets ``module.name``, which must exist (see the module docstring)."""
    if not hasattr(module, name):
        raise RuntimeError(f"cpu_compat: {module.__name__}.{name} does not exist in this megatron-core; the CPU "
                           "redirection that replaces it needs adapting to this release")
    setattr(module, name, value)


def is_active() -> bool:
    """True when the redirections are in place in this process."""
    return _installed


def install() -> bool:
    """Installs the redirections when CUDA is unavailable; returns whether they are active. Idempotent."""
    global _installed
    if _installed or torch.cuda.is_available():
        return _installed

    _CudaDeviceToCpu().__enter__()

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Event = _WallClockEvent
    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.random.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed

    torch.Generator = _CpuGenerator
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    original_new_empty = torch.Tensor.new_empty

    def _new_empty(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        return original_new_empty(self, *args, **kwargs)

    torch.Tensor.new_empty = _new_empty
    original_type = torch.Tensor.type

    def _type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type

    from megatron.core.inference import communication_utils
    from megatron.core.tensor_parallel import random as tp_random

    _replace(communication_utils, "_is_cuda", _is_present)

    from megatron.core.transformer.moe import moe_utils

    from megatron.core.transformer.moe import token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _replace(token_dispatcher, "maybe_move_tensor_to_cpu", _host_tensor)

    original_backward = tp_random.CheckpointFunction.backward

    def _backward_on_cpu(ctx: Any, *grads: torch.Tensor):
        with _CudaDeviceToCpu():
            return original_backward(ctx, *grads)

    tp_random.CheckpointFunction.backward = staticmethod(_backward_on_cpu)
    _replace(tp_random, "_get_cuda_rng_state", _cpu_rng_state)
    _replace(tp_random, "_set_cuda_rng_state", _set_cpu_rng_state)
    # The RNG tracker warns whenever the CPU generator moves inside fork(); on CPU that generator *is* the
    # forked CUDA state, so the warning is expected and only noise.
    logging.getLogger(tp_random.__name__).setLevel(logging.ERROR)

    _installed = True
    return True
