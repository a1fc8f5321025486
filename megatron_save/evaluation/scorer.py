"""Scores conversations with a reward model as reward-bench does: chat template, left truncation, each distinct
conversation once, batches grouped by length, a progress bar. Our Megatron RM (any TP / PP) or an HF model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_save.data.batching import pad_rows
from megatron_save.data.chat import Messages, encode_conversation

# (input_ids [N, S], attention_mask [N, S]) -> rewards [N]
BatchScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score_conversations(
    conversations: list[Messages], tokenizer: Any, score_batch: BatchScorer, batch_size: int, max_length: int
) -> list[float]:
    """One score per conversation; identical conversations are scored once. Raises on a non-finite score."""
    token_ids = [encode_conversation(tokenizer, messages)[-max_length:] for messages in conversations]
    distinct = sorted({tuple(ids) for ids in token_ids}, key=len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: dict[tuple[int, ...], float] = {}
    quiet = dist.is_initialized() and dist.get_rank() != 0
    with tqdm(total=len(distinct), desc="scoring", unit="seq", disable=quiet, dynamic_ncols=True) as bar:
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            input_ids, mask = pad_rows([list(ids) for ids in chunk], pad_id)
            scores.update(zip(chunk, score_batch(input_ids, mask).float().cpu().tolist()))
            bar.update(len(chunk))
    bad = [i for i, ids in enumerate(token_ids) if not math.isfinite(scores[tuple(ids)])]
    if bad:
        raise ValueError(f"the reward model gave a non-finite score to {len(bad)} conversations (first: #{bad[0]})")
    return [scores[tuple(ids)] for ids in token_ids]


def megatron_batch_scorer(ckpt_dir: str | Path) -> tuple[BatchScorer, Any]:
    """Our reward-model checkpoint at the current TP / PP (Megatron's groups must exist) and its tokenizer."""
    from transformers import AutoTokenizer

    from megatron_save.checkpoint import build_model_from_checkpoint
    from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
    from megatron_save.models.forward import score_sequences

    model, meta, _ = build_model_from_checkpoint(ckpt_dir)
    if meta.kind != "reward_model":
        raise ValueError(f"{ckpt_dir}: holds a {meta.kind}, not a reward model")
    tokenizer = AutoTokenizer.from_pretrained(Path(ckpt_dir) / HF_SUBDIR)
    return (lambda ids, mask: score_sequences(model, ids, mask, micro_batch_size=ids.shape[0]).rewards), tokenizer


def hf_batch_scorer(model_dir: str | Path, device: str | None = None) -> tuple[BatchScorer, Any]:
    """A transformers ``*ForSequenceClassification`` reward model (reference scoring) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    @torch.no_grad()
    def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits[:, 0]

    return score, tokenizer
