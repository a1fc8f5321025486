"""Loads a converted checkpoint at the given TP / PP and prints its largest difference from transformers.

    torchrun --nproc-per-node 2 tools/check_parity.py --ckpt CKPT_DIR --hf-dir HF_DIR --tp 2 --pp 1
"""

import argparse

import torch

from megatron_save.checkpoint.parity import max_abs_diff_vs_transformers
from megatron_save.config import ParallelConfig
from megatron_save.distributed import init_distributed, shutdown_distributed
from megatron_save.utils.logging import get_logger

logger = get_logger("tools.check_parity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 100, (args.batch_size, args.seq_len), generator=generator)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    diff = max_abs_diff_vs_transformers(args.ckpt, args.hf_dir, input_ids, mask)
    verdict = "OK" if diff <= args.tolerance else "MISMATCH"
    logger.info("max |megatron - transformers| = %.3e at TP=%d PP=%d (tolerance %.0e): %s",
                diff, args.tp, args.pp, args.tolerance, verdict)
    shutdown_distributed()
    if diff > args.tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
