"""megatron-save: SAVE (arXiv 2605.30888) reward-model self-improvement during critic-free RL on Megatron-Core."""

import warnings

__version__ = "0.1.0"

FALLBACK_WARNING = r"(Transformer ?Engine and Apex are|Transformer ?Engine is|Apex is) not installed"
"""What Megatron-Core says, once per module at import, about each PyTorch fallback it takes without Transformer
Engine or Apex."""


def silence_fallback_warnings() -> None:
    """Silences Megatron-Core's fallback warnings (five UserWarnings on every CPU launch, all expected), by message
    and module only; the entry point logs them as one info line instead."""
    warnings.filterwarnings("ignore", message=FALLBACK_WARNING, category=UserWarning,
                            module=r"(megatron\.core|megatron_fsdp)(\.|$)")


silence_fallback_warnings()  # here, before any module of ours imports megatron.core
