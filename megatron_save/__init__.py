"""megatron-save: SAVE (arXiv 2605.30888) reward-model self-improvement during critic-free RL on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Megatron-Core warns, once per module at import, about each PyTorch fallback it takes without Transformer Engine
# or Apex: five UserWarnings on every CPU launch, all expected. Only those are silenced (by message and module),
# before any module of ours imports megatron.core; the entry point logs them as one info line.
FALLBACK_WARNING = r"(Transformer ?Engine and Apex are|Transformer ?Engine is|Apex is) not installed"
warnings.filterwarnings("ignore", message=FALLBACK_WARNING, category=UserWarning,
                        module=r"(megatron\.core|megatron_fsdp)(\.|$)")
