"""The forwards and backwards of each stage-3 model, counted by hooks on the models themselves (not by the
``passes/*`` metrics, which the trainer computes from what it means to run): the shared helper of
tests/gpu/test_gpu_save_cost.py (on a GPU) and tests/unit/test_pass_counts.py (on CPU).

Every model call of the trainer goes through ``models.forward.run_model``: ``model(tokens [b, S], position_ids,
None)``. A forward hook on each model adds the call's rows (sequences) to its forward count; when the call builds a
graph, it hooks the gradient of the call's output, and the first gradient that reaches it adds the same rows to the
backward count: one backward through the model for those sequences."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from helpers import STAGE3_CPU_CONFIG, stage3_overrides


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


class PassCounter:
    """Rows through each watched model: ``forward[name]`` and ``backward[name]``."""

    def __init__(self) -> None:
        self.forward: Counter = Counter()
        self.backward: Counter = Counter()
        self._handles = []

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def on_forward(_module, args, kwargs, output):
            tokens = args[0] if args else kwargs.get("input_ids")
            rows = tokens.shape[0] if isinstance(tokens, torch.Tensor) else 0
            self.forward[name] += rows
            graph = [t for t in _tensors(output) if t.requires_grad] if torch.is_grad_enabled() else []
            if graph:
                reached = []

                def on_gradient(gradient):
                    if not reached:  # one backward, however many of the outputs the loss read
                        reached.append(True)
                        self.backward[name] += rows
                    return gradient

                for tensor in graph:
                    tensor.register_hook(on_gradient)

        self._handles.append(module.register_forward_hook(on_forward, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class StepPasses:
    """One stage-3 step's rows through each model, by hooks, and the metrics the step logged."""

    forward: Counter
    backward: Counter
    metrics: dict[str, float]


def hooked_stage3_step(output_dir: Path, policy: Path, reward: Path, prompts: Path, *overrides: str) -> StepPasses:
    """Builds the run of examples/cpu/stage3_save.yaml (with ``overrides``) in this process, a world of one, and
    runs its first step with every model watched."""
    from megatron_save.config import load_config
    from megatron_save.trainers.stage3 import Stage3Config
    from megatron_save.trainers.stage3.loop import rl_step
    from megatron_save.trainers.stage3.run import build_stage3_run

    cfg = load_config(Stage3Config, STAGE3_CPU_CONFIG, stage3_overrides(
        output_dir, policy, reward, prompts, "tensorboard=false", "save_every=0", *overrides))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    run = build_stage3_run(cfg)
    run.sync_rollout_weights()  # as train_stage3 starts
    run.offload.offload_all()
    counter = PassCounter()
    for name, model in (("policy", run.policy), ("reference", run.reference), ("reward", run.reward_model)):
        if model is not None:
            counter.watch(name, model)
    try:
        metrics = rl_step(run, cfg, 1, Counter())
    finally:
        counter.remove()
    return StepPasses(counter.forward, counter.backward, metrics)


def check_save_against_grpo(grpo: StepPasses, save: StepPasses) -> None:
    """What a SAVE step runs beyond a GRPO one (a frozen RM), by the hooks: its reward-model update is the scoring's
    forward with one backward, then the updated RM re-scores the batch (one more forward); the policy's work per
    update row is the same. And the trainer's ``passes/*`` metrics say the same as the hooks."""
    scored = grpo.forward["reward"]  # GRPO's one scoring: every response of the step
    assert scored > 0 and grpo.backward["reward"] == 0, (grpo.forward, grpo.backward)
    assert save.forward["reward"] == 2 * scored, (save.forward, scored)
    assert save.backward["reward"] == scored, (save.backward, scored)
    for step in (grpo, save):
        updated = step.backward["policy"]  # the policy update's rows, each once through its backward
        assert updated > 0 and step.backward["reference"] == 0, step.backward
        assert step.forward["policy"] / updated == step.metrics["passes/policy_forward"], (step.forward, step.metrics)
        assert step.forward["reference"] / updated == step.metrics.get("passes/reference_forward", 0.0)
        assert step.metrics["passes/policy_backward"] == 1.0
        assert step.forward["reward"] / scored == step.metrics["passes/reward_forward"], step.metrics
        assert step.backward["reward"] / scored == step.metrics.get("passes/reward_backward", 0.0), step.metrics
    assert save.forward["policy"] / save.backward["policy"] == grpo.forward["policy"] / grpo.backward["policy"]
