"""Idle training state off the GPU between the phases of a stage-3 step.

A SAVE step runs rollout, scoring, the reward-model update and the policy update one after another on the same
ranks, so each model's optimizer state and gradient buffers sit unused through most of the step. Gradient
buffers are freed and reallocated with Megatron-Core's ``DistributedDataParallel.offload_grad_buffers`` /
``restore_grad_buffers``. Megatron's optimizer ``offload_to_cpu`` is not used: it moves every parameter of the
optimizer's groups, and in fp32 training those are the model's own weights, which rollout sync and scoring need
on the device. :func:`optimizer_own_tensors` selects what the optimizer alone holds (Adam moments, fp32 main
copies of bf16 / fp16 weights) and only that moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_save.models.train_state import TrainState
from megatron_save.utils.logging import get_logger

logger = get_logger("trainers.offload")
REFERENCE = "reference"


@dataclass
class OffloadSettings:
    """What leaves the GPU while it is idle between the phases of a step (room for larger rollout batches)."""

    optimizer: bool = False
    """Each trained model's Adam moments and fp32 main copies of bf16 / fp16 weights to host memory outside its
    own update (weights the optimizer steps in place, fp32 ones, stay)."""
    gradients: bool = False
    """Free each trained model's gradient buffers outside its own update (reallocated and zeroed before it)."""
    reference: bool = False
    """The frozen reference policy's weights to host memory except while its log-probs are computed."""


def _model_storages(state: TrainState) -> set[int]:
    """Addresses of the storages of the model's weights (its parameters and DDP's contiguous parameter buffers)."""
    storages = {p.untyped_storage().data_ptr() for p in state.module.parameters()}
    storages |= {b.param_data.untyped_storage().data_ptr() for b in state.model.buffers if b.param_data is not None}
    return storages - {0}


def optimizer_own_tensors(state: TrainState) -> tuple[list[torch.Tensor], list[tuple[dict, str]]]:
    """What the optimizer holds apart from the model: (its group parameters that share no storage with the
    model's weights, i.e. fp32 main copies of low-precision weights; the (state dict, key) slots of its state
    tensors, e.g. Adam's moments)."""
    model = _model_storages(state)
    chained = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    inner = [o.optimizer for o in chained if getattr(o, "optimizer", None) is not None]
    params = [p for o in inner for group in o.param_groups for p in group["params"]
              if p.untyped_storage().data_ptr() not in model]
    slots = [(values, key) for o in inner for values in o.state.values()
             for key, value in values.items() if isinstance(value, torch.Tensor)]
    return params, slots


@dataclass
class MovedTensors:
    """Optimizer tensors moved to host memory, each with the device it came from."""

    params: list[tuple[torch.Tensor, torch.device]]
    """Group parameters (moved through ``.data``, so the optimizer keeps the same objects)."""
    slots: list[tuple[dict, str, torch.device]]
    """(state dict, key) slots of state tensors."""


def optimizer_to_host(state: TrainState) -> MovedTensors:
    """Moves the optimizer's own device tensors to host memory; returns what moved."""
    params, slots = optimizer_own_tensors(state)
    moved = MovedTensors([(p, p.device) for p in params if p.device.type != "cpu"],
                         [(values, key, values[key].device) for values, key in slots
                          if values[key].device.type != "cpu"])
    for param, _ in moved.params:
        param.data = param.data.cpu()
    for values, key, _ in moved.slots:
        values[key] = values[key].cpu()
    return moved


def optimizer_back(moved: MovedTensors) -> None:
    """Puts what :func:`optimizer_to_host` moved back on its device (host-resident state, such as the step
    counter of torch's Adam, never left and stays on the host)."""
    for param, device in moved.params:
        param.data = param.data.to(device)
    for values, key, device in moved.slots:
        values[key] = values[key].to(device)


class IdleOffload:
    """Tracks which models' training state is on the device and moves the rest off it.

    ``states`` are the trained models by name (as in run checkpoints); ``reference`` is the frozen reference
    policy, managed under the name ``"reference"``. Names without a managed model are ignored, so a phase can
    name its model whatever the strategy.
    """

    def __init__(self, settings: OffloadSettings, states: dict[str, TrainState], reference: torch.nn.Module | None):
        self.settings = settings
        self.states = states
        self.reference = reference if settings.reference else None
        self.cuda = torch.cuda.is_available()
        self.offloaded: set[str] = set()
        self.moved: dict[str, MovedTensors] = {}
        if self.managed():
            moved = [what for what, on in (("optimizer states", settings.optimizer),
                                           ("gradient buffers", settings.gradients)) if on and states]
            logger.info("between phases, off the device: %s", "; ".join(
                ([f"{' and '.join(moved)} of {', '.join(states)}"] if moved else [])
                + (["reference weights"] if self.reference is not None else [])))

    def managed(self) -> list[str]:
        """The names whose state this object moves."""
        names = list(self.states) if self.settings.optimizer or self.settings.gradients else []
        return names + ([REFERENCE] if self.reference is not None else [])

    def offload(self, *names: str) -> None:
        """Moves the named models' idle state off the device (already offloaded or unmanaged names: nothing)."""
        for name in (set(names) & set(self.managed())) - self.offloaded:
            if name == REFERENCE:
                self.reference.to(torch.device("cpu"))
            else:
                state = self.states[name]
                if self.settings.optimizer:
                    self.moved[name] = optimizer_to_host(state)
                if self.settings.gradients:
                    state.model.offload_grad_buffers(synchronize=self.cuda, empty_cache=self.cuda)
            self.offloaded.add(name)
        if self.cuda and names:
            torch.cuda.empty_cache()

    def restore(self, *names: str) -> None:
        """Brings the named models' state back onto the device."""
        for name in set(names) & self.offloaded:
            if name == REFERENCE:
                self.reference.to(torch.device("cuda", torch.cuda.current_device()) if self.cuda else "cpu")
            else:
                state = self.states[name]
                if self.settings.optimizer:
                    optimizer_back(self.moved.pop(name))
                if self.settings.gradients:
                    state.model.restore_grad_buffers(synchronize=self.cuda)
            self.offloaded.discard(name)

    def offload_all(self) -> None:
        """Everything managed off the device (the state between steps)."""
        self.offload(*self.managed())

    @contextmanager
    def resident(self, *names: str) -> Iterator[None]:
        """The named models' state on the device for the body, off it afterwards."""
        self.restore(*names)
        yield
        self.offload(*names)
