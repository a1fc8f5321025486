"""Idle training state off the GPU between the phases of a stage-3 step, with Megatron-Core's own offload calls.

A SAVE step runs rollout, scoring, the reward-model update and the policy update one after another on the same
ranks, so each model's optimizer state and gradient buffers sit unused through most of the step. Megatron-Core
0.16 moves an optimizer's state to host memory (``MegatronOptimizer.offload_to_cpu`` / ``restore_from_cpu``) and
frees and reallocates DDP gradient buffers (``DistributedDataParallel.offload_grad_buffers`` /
``restore_grad_buffers``); :class:`IdleOffload` calls them so that only the phase's own model holds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_save.trainers.optimizer import TrainState
from megatron_save.utils.logging import get_logger

logger = get_logger("trainers.offload")
REFERENCE = "reference"


@dataclass
class OffloadSettings:
    """What leaves the GPU while it is idle between the phases of a step (room for larger rollout batches)."""

    optimizer: bool = False
    """Adam moments and fp32 main weights of each trained model to host memory outside its own update (bf16 /
    fp16 models: with fp32 weights Megatron's optimizer holds the model's own parameters, which stay)."""
    gradients: bool = False
    """Free each trained model's gradient buffers outside its own update (reallocated and zeroed before it)."""
    reference: bool = False
    """The frozen reference policy's weights to host memory except while its log-probs are computed."""


def optimizer_holds_model_weights(state: TrainState) -> bool:
    """True when the optimizer's parameters share storage with the model's weights (fp32 training, where
    Megatron's optimizer steps the model's own parameters): moving them would move the model."""
    weights = {p.untyped_storage().data_ptr() for p in state.module.parameters()}
    weights |= {b.param_data.untyped_storage().data_ptr() for b in state.model.buffers if b.param_data is not None}
    weights.discard(0)
    return any(p.untyped_storage().data_ptr() in weights
               for group in state.optimizer.param_groups for p in group["params"])


class IdleOffload:
    """Tracks which models' training state is on the device and moves the rest off it.

    ``states`` are the trained models by name (as in run checkpoints); ``reference`` is the frozen reference
    policy, managed under the name ``"reference"``. Names without a managed model are ignored, so a phase can
    name its model whatever the strategy.
    """

    def __init__(self, settings: OffloadSettings, states: dict[str, TrainState], reference: torch.nn.Module | None):
        if settings.optimizer:
            for name, state in states.items():
                if optimizer_holds_model_weights(state):
                    raise ValueError(
                        f"offload.optimizer=true: the {name} optimizer steps the model's own fp32 weights, which "
                        "every phase that runs the model needs; train in bf16 (convert with --dtype bf16) or set "
                        "offload.optimizer=false")
        self.settings = settings
        self.states = states
        self.reference = reference if settings.reference else None
        self.cuda = torch.cuda.is_available()
        self.offloaded: set[str] = set()
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
                    state.optimizer.offload_to_cpu()
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
                    state.optimizer.restore_from_cpu()
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
