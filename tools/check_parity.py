"""Loads a converted checkpoint at the given TP / PP and compares it with transformers on real text.

    torchrun --nproc-per-node 2 tools/check_parity.py --ckpt CKPT_DIR --hf-dir HF_DIR --tp 2 --pp 1
    torchrun --nproc-per-node 4 tools/check_parity.py --ckpt CKPT_DIR --hf-dir HF_DIR --tp 2 --pp 2 \\
        --text notes.txt --max-length 512 --rtol 1e-3
    torchrun --nproc-per-node 4 tools/check_parity.py --ckpt MOE_CKPT --hf-dir MOE_HF_DIR --tp 2 --ep 2

Input: a built-in sample of short user / assistant conversations (megatron_save.checkpoint.parity.CHAT_SAMPLE),
rendered with the checkpoint's tokenizer (CKPT_DIR/hf) and its chat template, or as plain "Role: content" text
when the tokenizer has none; or, with --text FILE, a plain text file in which every paragraph (a block of lines
separated from the next by a blank line) is one sequence. Sequences are cut to --max-length tokens and
right-padded into one batch. Any layout works: DP = world size / (TP x PP) replicas run the same batch. A layout
that cannot split the model (say TP=2 over 9 heads) is refused in one line before any process group starts.

Compared (the Megatron model is built once, transformers runs once, in fp32):
  causal LM: logits over real tokens: max |megatron - transformers|; "rel" = that maximum divided by
    max |transformers logit| (the error on the scale of the logits, not per entry); top-1 = the fraction of
    real tokens whose argmax next token agrees; max |dlogp| = largest log-prob difference of the actual next
    tokens (Megatron's through the vocab-parallel cross entropy).
  reward model: the rewards (and the values, read at half of each sequence, when the checkpoint has a value
    head): max abs and relative difference as above. There is no top-1 for a reward model; the pairwise
    ranking agreement of the rewards across the batch is printed, not gated. Each reward is read where
    transformers' *ForSequenceClassification reads it: at the sequence's last token that is not the config's
    pad token (with pad = EOS, before a trailing EOS; the chat sample's conversations end in EOS).
  both: the rotary inverse frequencies of the Megatron model against transformers' (relative, per frequency):
    a short input barely turns RoPE's low frequencies, so a wrong Llama-3 scaling factor would hide in the
    logits; the frequencies show it at once (gated at 2e-6, see megatron_save.checkpoint.parity.ROPE_RTOL).

Passes when every relative difference is <= --rtol, top-1 >= --min-top1 (causal LMs) and the rotary
frequencies agree. Defaults follow the
checkpoint's dtype: rtol 1e-4 and top-1 98% for fp32, rtol 2e-2 and top-1 90% for bf16. Rank 0 logs one line
with the thresholds and OK or MISMATCH; the exit status is 1 on MISMATCH.
"""

import argparse
from pathlib import Path

import transformers

from megatron_save.checkpoint import read_checkpoint_meta
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.checkpoint.parity import (
    DEFAULT_MIN_TOP1,
    DEFAULT_RTOL,
    ParityBatch,
    chat_sequences,
    parity_batch,
    parity_failures,
    parity_report,
    text_sequences,
    verdict_line,
)
from megatron_save.config.parallel import add_layout_arguments, layout_from_arguments
from megatron_save.distributed import ParallelLayoutError, init_distributed, shutdown_distributed
from megatron_save.models.gpt_config import model_shape
from megatron_save.models.spec import SpecBackend, resolve_backend
from megatron_save.utils.logging import get_logger

logger = get_logger("tools.check_parity")


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="converted checkpoint directory")
    parser.add_argument("--hf-dir", required=True, help="the transformers model it should match")
    add_layout_arguments(parser)
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="Megatron's sequence parallelism (TP > 1; needs the Transformer Engine spec)")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="plain text file, one sequence per paragraph (default: the built-in chat sample)")
    parser.add_argument("--spec", choices=[b.value for b in SpecBackend], default="auto",
                        help="layer implementation: te (Transformer Engine, GPU), local (Megatron-Core's modules), "
                             "auto (te when importable on GPU, else local)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence at most (default 256)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="relative tolerance (default: 1e-4 for fp32 checkpoints, 2e-2 for bf16)")
    parser.add_argument("--min-top1", type=float, default=None,
                        help="minimum top-1 agreement of a causal LM, 0..1 (default: 0.98 fp32, 0.90 bf16)")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def load_batch(ckpt: Path, text_file: str | None, max_length: int) -> ParityBatch:
    """The batch to compare on, tokenized with the checkpoint's tokenizer; SystemExit naming the file on error."""
    tokenizer_dir = ckpt / HF_SUBDIR
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as error:
        raise SystemExit(f"check_parity: cannot load the tokenizer of {tokenizer_dir}: {error}") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is masked out anyway
    if text_file is None:
        sequences, source = chat_sequences(tokenizer), "the built-in chat sample"
    else:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise SystemExit(f"check_parity: --text {text_file}: {error}") from None
        sequences, source = text_sequences(tokenizer, text), f"--text {text_file}"
    try:
        return parity_batch(sequences, pad_id, max_length)
    except ValueError as error:
        raise SystemExit(f"check_parity: {source} (--max-length {max_length}): {error}") from None


def main() -> None:
    args = parse_args()
    ckpt = Path(args.ckpt)
    try:
        meta, hf_config = read_checkpoint_meta(ckpt)
    except (OSError, ValueError) as error:
        raise SystemExit(f"check_parity: {error}") from None
    rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL.get(meta.dtype, DEFAULT_RTOL["bf16"])
    min_top1 = args.min_top1 if args.min_top1 is not None else DEFAULT_MIN_TOP1.get(meta.dtype,
                                                                                      DEFAULT_MIN_TOP1["bf16"])
    batch = load_batch(ckpt, args.text, args.max_length)
    try:
        parallel = layout_from_arguments(args, sequence_parallel=args.sequence_parallel)
        init_distributed(parallel, model_shape(hf_config, str(ckpt)))
    except ParallelLayoutError as error:
        raise SystemExit(f"check_parity: {error}") from None
    try:
        spec = resolve_backend(args.spec)
    except ValueError as error:
        raise SystemExit(f"check_parity: --spec {args.spec}: {error}") from None
    try:
        report = parity_report(ckpt, args.hf_dir, batch, spec_backend=spec)
    except ParallelLayoutError as error:
        raise SystemExit(f"check_parity: {error}") from None
    experts = f" EP={args.ep} ETP={args.etp}" if args.ep > 1 or args.etp > 1 else ""
    logger.info("%s %s at TP=%d PP=%d%s%s, %s spec, %d sequences / %d tokens of %s: %s", meta.kind, meta.dtype,
                args.tp, args.pp, experts, " SP" if args.sequence_parallel else "", spec.value, report.sequences,
                report.tokens, args.text or "the chat sample", verdict_line(report, rtol, min_top1))
    shutdown_distributed()
    if parity_failures(report, rtol, min_top1):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
