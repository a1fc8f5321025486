"""Scores conversations with a reward model as reward-bench does: chat template, left truncation, each distinct
conversation once, batches grouped by length, a progress bar. Our Megatron RM (any TP / PP) or an HF model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from megatron_save.data.batching import pad_id_of
from megatron_save.data.chat import Messages, encode_conversation
from megatron_save.utils.tensors import pad_rows

# distinct token sequences -> one reward each
SequenceScorer = Callable[[list[list[int]]], list[float]]


def score_conversations(
    conversations: list[Messages], tokenizer: Any, score_sequences: SequenceScorer, max_length: int
) -> list[float]:
    """One score per conversation; identical conversations are scored once. Raises on a non-finite score."""
    token_ids = [tuple(encode_conversation(tokenizer, messages)[-max_length:]) for messages in conversations]
    distinct = sorted(set(token_ids), key=len)
    scores = dict(zip(distinct, score_sequences([list(ids) for ids in distinct])))
    bad = [i for i, ids in enumerate(token_ids) if not math.isfinite(scores[ids])]
    if bad:
        raise ValueError(f"the reward model gave a non-finite score to {len(bad)} conversations (first: #{bad[0]})")
    return [scores[ids] for ids in token_ids]


def megatron_sequence_scorer(ckpt_dir: str | Path, batch_size: int) -> tuple[SequenceScorer, Any]:
    """Our reward-model checkpoint at the current TP / PP / DP (Megatron's groups must exist), and its tokenizer."""
    from transformers import AutoTokenizer

    from megatron_save.checkpoint import build_model_from_checkpoint
    from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
    from megatron_save.models.forward import score_token_sequences

    model, meta, _ = build_model_from_checkpoint(ckpt_dir)
    if meta.kind != "reward_model":
        raise ValueError(f"{ckpt_dir}: holds a {meta.kind}, not a reward model")
    tokenizer = AutoTokenizer.from_pretrained(Path(ckpt_dir) / HF_SUBDIR)
    pad_id = pad_id_of(tokenizer)
    return (lambda sequences: score_token_sequences(model, sequences, pad_id, batch_size).rewards.tolist()), tokenizer


def hf_sequence_scorer(model_dir: str | Path, batch_size: int, device: str | None = None
                       ) -> tuple[SequenceScorer, Any]:
    """A transformers ``*ForSequenceClassification`` reward model (reference scoring) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The classifier reads each sequence at its last token that is not config.pad_token_id: pad with that id, and
    # keep it (our Megatron model reads by the same rule); a config without one gets the tokenizer's to batch.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id_of(tokenizer)
    pad_id = model.config.pad_token_id

    @torch.no_grad()
    def score(sequences: list[list[int]]) -> list[float]:
        rewards = []
        for start in tqdm(range(0, len(sequences), batch_size), desc="scoring", unit="batch"):
            input_ids, mask = pad_rows(sequences[start : start + batch_size], pad_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device)).logits
            rewards += logits[:, 0].float().cpu().tolist()
        return rewards

    return score, tokenizer
