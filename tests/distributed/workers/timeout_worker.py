"""torchrun worker (2 processes, TP=2): rank 1 stops itself (SIGSTOP) and rank 0 waits for it in an all-reduce over
Megatron's tensor-parallel group. With parallel.timeout_minutes=0.1 rank 0 must fail after about 6 s; it writes
how long it waited and the error to --out, then exits with an error so that torchrun ends the job."""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_save.config import ParallelConfig
from megatron_save.distributed import init_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(ParallelConfig(tensor_model_parallel_size=2, timeout_minutes=0.1))
    dist.barrier()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=parallel_state.get_tensor_model_parallel_group())
        error = None
    except Exception as caught:  # noqa: BLE001 - the test reads what the timeout raised
        error = f"{type(caught).__name__}: {caught}"
    Path(args.out).write_text(json.dumps({"waited_s": time.monotonic() - start, "error": error}))
    raise SystemExit(1)


if __name__ == "__main__":
    main()
