"""Small tensor helpers shared by data batching, model forward passes, trainers and evaluation."""

from __future__ import annotations

import torch


def pad_rows(sequences: list[list[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads token lists to ``length`` (default: the longest) -> input_ids [N, S], attention_mask [N, S]."""
    length = length or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, sequence in enumerate(sequences):
        input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[i, : len(sequence)] = True
    return input_ids, mask
