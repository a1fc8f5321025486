"""Converts a megatron-save checkpoint (any TP / PP it was trained at) back to a Hugging Face model directory
that ``from_pretrained`` loads; config and tokenizer files are copied along.

    python tools/convert_megatron_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--max-shard-size 5GB]

Under torchrun with two or more processes the export streams: the processes take turns loading one part of the
model at a time (the embedding, a layer, the final norm, the heads) and each writes its own shards as they fill, so
a process holds at most one layer plus one output shard, whatever the model's depth:

    torchrun --nproc-per-node 2 tools/convert_megatron_to_hf.py --ckpt CKPT_DIR --out HF_DIR --max-shard-size 2GB
"""

import argparse

from megatron_save.checkpoint.convert import convert_megatron_to_hf
from megatron_save.distributed import shutdown_distributed

_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30}


def parse_size(text: str) -> int:
    for unit, scale in _UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="megatron-save checkpoint directory")
    parser.add_argument("--out", required=True, help="new HF model directory (must not exist or be empty)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    convert_megatron_to_hf(args.ckpt, args.out, max_shard_bytes=parse_size(args.max_shard_size))
    shutdown_distributed()


if __name__ == "__main__":
    main()
