"""megatron-save: SAVE (arXiv 2605.30888) reward-model self-improvement during critic-free RL on Megatron-Core."""

__version__ = "0.1.0"
