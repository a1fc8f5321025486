"""torchrun worker (2 processes, TP=2): rank 1 stops itself (SIGSTOP) and rank 0 waits for it in an all-reduce over
Megatron's tensor-parallel group, laid out with parallel.timeout_minutes=0.1: rank 0 must fail after about 6 s; it
writes how long it waited and the error to --out, then exits with an error so that torchrun ends the job.

Start-up runs under a generous timeout (30 minutes, the default): the two processes import torch and Megatron at their
own pace, and on a loaded machine one may reach the first collective long after the other, which under a 6 s timeout
failed before anything was measured (and wrote no report). Once both have met at a barrier, Megatron's groups are
laid out again with the short timeout (set_model_parallel keys its groups on it), both ranks in step, and only the
measured wait runs under it."""

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
from megatron_save.distributed import init_distributed, set_model_parallel

TIMEOUT_MINUTES = 0.1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    dist.barrier()
    set_model_parallel(ParallelConfig(tensor_model_parallel_size=2, timeout_minutes=TIMEOUT_MINUTES))
    dist.barrier()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=parallel_state.get_tensor_model_parallel_group())
        error = None
    except Exception as caught:  # noqa: BLE001 - the test reads what the timeout raised
        error = f"{type(caught).__name__}: {caught}"
    Path(args.out).write_text(json.dumps({"waited_s": time.monotonic() - start, "error": error,
                                          "timeout_s": TIMEOUT_MINUTES * 60}))
    raise SystemExit(1)


if __name__ == "__main__":
    main()
