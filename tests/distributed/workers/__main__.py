"""``python -m workers WORKER ARGS...`` (tests/distributed on the path): runs ``WORKER.main()`` with ARGS.

Launching a worker through this package ``__main__`` rather than by its file path keeps Megatron-Core's checkpoint
writer cheap: its spawn-context helper process re-imports the launching script unless that is a package's
``__main__`` (see megatron_save/__main__.py), which would repeat every import of torch and Megatron per rank.
"""

import importlib
import sys

if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m workers WORKER [ARGS ...]  (a module of tests/distributed/workers)")
    worker = sys.argv[1]
    sys.argv = [worker, *sys.argv[2:]]
    importlib.import_module(f"workers.{worker}").main()
