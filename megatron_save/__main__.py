"""The command line: ``python -m megatron_save COMMAND ARGS...``, under torchrun for the trainers, e.g.

    torchrun --nproc-per-node 4 -m megatron_save stage3 CONFIG.yaml [MORE.yaml ...] [key=value ...]

Commands: ``sft``, ``stage1``, ``stage2``, ``stage3``, ``sample-responses`` (YAML configs, then ``key=value``
overrides), ``testbed-models`` and ``testbed-eval`` (steps of the gold-reward testbed). ``COMMAND --help`` lists a
command's settings (or options), ``--print-config`` the merged config of a YAML-driven one.

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

import difflib
import importlib
import importlib.util
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


SETTINGS = {
    "sft": "SFTConfig",
    "stage1": "Stage1Config",
    "stage2": "Stage2Config",
    "stage3": "Stage3Config",
    "sample-responses": "SampleResponsesConfig",
}
"""The config dataclass (in the command's module) whose settings a YAML-driven command takes; the other commands
take options, from their module's ``build_parser()``."""

USAGE = "usage: megatron-save COMMAND ARGS... (torchrun [...] -m megatron_save COMMAND ARGS...)"


def _log_fallbacks() -> None:
    """One info line for what megatron_save/__init__.py silenced: megatron-core's PyTorch fallbacks."""
    if "megatron.core" not in sys.modules:
        return
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if missing:
        from megatron_save.utils.logging import get_logger

        get_logger("cli").info("%s not installed: megatron-core uses its PyTorch fallbacks (expected on CPU)",
                               " and ".join(missing))


def main(argv: list[str]) -> None:
    """Runs ``COMMANDS[argv[0]]``'s ``main`` with the rest of the arguments."""
    if not argv or argv[0] in ("-h", "--help"):  # asked for: stdout and exit 0; no command: stderr and exit 2
        (sys.stdout if argv else sys.stderr).write(f"{USAGE}\ncommands: {', '.join(COMMANDS)}\n"
                                                   "(megatron-save COMMAND --help: its settings or options)\n")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        sys.stderr.write(f"megatron-save: error: unknown command {argv[0]!r}{hint}; commands: {', '.join(COMMANDS)}\n")
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[argv[0]])
    _log_fallbacks()
    module.main(argv[1:])


def cli() -> None:
    """The ``megatron-save`` console command."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
