"""The command line: ``python -m megatron_save COMMAND ARGS...``, under torchrun for the trainers, e.g.

    torchrun --nproc-per-node 4 -m megatron_save stage3 CONFIG.yaml [MORE.yaml ...] [key=value ...]

Commands: ``sft``, ``stage1``, ``stage2``, ``stage3`` (the trainers: YAML configs, then ``key=value`` overrides),
``testbed-models`` and ``testbed-eval`` (steps of the gold-reward testbed).

Why one package entry point: Megatron-Core's checkpoint writer starts a multiprocessing manager with the spawn
method, and a spawned interpreter imports the launching module again (as ``__mp_main__``) unless that module is a
package's ``__main__``. Launched from here, that helper process of every rank imports neither torch, Megatron nor
transformers, which saves each checkpointing rank several seconds and a few hundred MB of host memory for the
whole run. A trainer module launched directly (``-m megatron_save.trainers.stage1_bt``) pays them. The
``megatron-save`` console command (``megatron-save COMMAND ...``; under torchrun ``torchrun --no-python ...
megatron-save COMMAND ...``) is the same: its launcher script imports only this module, so the spawned helper,
which re-runs that script, stays as light.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sft": "megatron_save.trainers.sft",
    "stage1": "megatron_save.trainers.stage1_bt",
    "stage2": "megatron_save.trainers.stage2_value",
    "stage3": "megatron_save.trainers.stage3",
    "sample-responses": "megatron_save.trainers.sample_responses",
    "testbed-models": "megatron_save.testbed.initial_models",
    "testbed-eval": "megatron_save.testbed.gold_eval",
}


def main(argv: list[str]) -> None:
    """Runs ``COMMANDS[argv[0]]``'s ``main`` with the rest of the arguments."""
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: torchrun [...] -m megatron_save COMMAND ARGS... (or python -m megatron_save ...)\n"
                         f"commands: {', '.join(COMMANDS)}")
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


def cli() -> None:
    """The ``megatron-save`` console command."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
