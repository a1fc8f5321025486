"""A logger that speaks on global rank 0 only, so multi-process launches print each message once."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "[%(asctime)s %(name)s] %(message)s"


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = os.environ.get("RANK")
        if rank is None:
            import torch.distributed as dist

            rank = str(dist.get_rank()) if dist.is_available() and dist.is_initialized() else "0"
        return rank == "0" or record.levelno >= logging.ERROR


def get_logger(name: str) -> logging.Logger:
    """Returns a logger under ``megatron_save`` that writes to stderr from rank 0 (errors from every rank)."""
    root = logging.getLogger("megatron_save")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("MEGATRON_SAVE_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root.getChild(name.removeprefix("megatron_save."))
