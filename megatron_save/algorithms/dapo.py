"""DAPO's reward shaping and group filter (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System
at Scale"): the soft overlong punishment (its eq. 13) and dynamic sampling's test for a group without signal."""

from __future__ import annotations

import torch


def overlong_penalty(response_lengths: torch.Tensor, max_length: int, buffer_length: int, penalty: float
                     ) -> torch.Tensor:
    """DAPO's soft overlong punishment, scaled by ``penalty``: 0 up to L_max - L_cache tokens, then falling
    linearly, -penalty * (|y| - (L_max - L_cache)) / L_cache, to -penalty at L_max (and beyond: responses stop
    there). ``buffer_length`` = L_cache, ``max_length`` = L_max. [...] int -> [...] fp32 (<= 0)."""
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"overlong buffer length {buffer_length} must be in (0, max length {max_length}]")
    excess = (response_lengths.float() - (max_length - buffer_length)).clamp(min=0.0, max=float(buffer_length))
    return -penalty * excess / buffer_length


def groups_with_spread(metric: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dynamic sampling's filter: a group carries signal when its valid responses' metric is not all equal
    (population std > 0). metric, valid [B, G] -> [B] bool (False for a group with fewer than 2 valid
    responses: no baseline, no advantage)."""
    values = metric.float().masked_fill(~valid, 0.0)
    count = valid.sum(dim=1)
    high = values.masked_fill(~valid, float("-inf")).amax(dim=1)
    low = values.masked_fill(~valid, float("inf")).amin(dim=1)
    return (count >= 2) & (high > low)
