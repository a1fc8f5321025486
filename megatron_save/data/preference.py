"""Preference pairs (prompt, chosen, rejected) tokenized for Bradley-Terry training, with counted skips."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megatron_save.data.chat import conversation, encode_conversation, response_text
from megatron_save.data.loading import chat_value, load_rows, require_fields
from megatron_save.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class PreferencePair:
    """One tokenized preference: the chosen and the rejected conversation."""

    chosen_ids: list[int]
    """Token ids of prompt + chosen response."""
    rejected_ids: list[int]
    """Token ids of prompt + rejected response."""

    @property
    def length(self) -> int:
        """The longer of the two sequences (what a batch has to pad to)."""
        return max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class LoadReport:
    """What happened to the rows of one source."""

    source: str
    """File or dataset name."""
    rows: int = 0
    """Rows read."""
    kept: int = 0
    """Rows turned into examples."""
    skipped: Counter = field(default_factory=Counter)
    """Rows left out, by reason."""

    def log(self) -> None:
        """One line on the rank-0 logger."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        logger.info("%s: %d rows, %d kept, skipped: %s", self.source, self.rows, self.kept, reasons)


def load_preference_pairs(
    source: str, tokenizer: Any, max_length: int, split: str = "train"
) -> tuple[list[PreferencePair], LoadReport]:
    """Tokenizes ``prompt`` / ``chosen`` / ``rejected`` rows (strings or chat message lists).

    Missing fields raise ValueError naming the file and row. Rows with an empty response or a conversation longer
    than ``max_length`` tokens are skipped and counted in the report (truncating would change what is preferred).
    """
    rows = load_rows(source, split)
    require_fields(rows, ("chosen", "rejected"), source)
    has_prompt = "prompt" in rows.column_names
    report = LoadReport(source)
    pairs = []
    for index, row in enumerate(rows):
        report.rows += 1
        chosen = chat_value(row, "chosen", index, source)
        rejected = chat_value(row, "rejected", index, source)
        prompt = chat_value(row, "prompt", index, source) if has_prompt else None
        if prompt is None and not (_has_user_turn(chosen) and _has_user_turn(rejected)):
            raise ValueError(f"{source}: row {index} has no 'prompt' field, and its chosen / rejected are not "
                             "conversations with a user turn")
        if not response_text(chosen).strip() or not response_text(rejected).strip():
            report.skipped["empty response"] += 1
            continue
        if prompt is not None and not response_text(prompt, role="user").strip() and not (
                _has_user_turn(chosen) and _has_user_turn(rejected)):
            report.skipped["empty prompt"] += 1  # the pair would be scored without any user turn
            continue
        pair = PreferencePair(
            chosen_ids=encode_conversation(tokenizer, conversation(prompt, chosen)),
            rejected_ids=encode_conversation(tokenizer, conversation(prompt, rejected)),
        )
        if pair.length > max_length:
            report.skipped[f"longer than {max_length} tokens"] += 1
            continue
        pairs.append(pair)
        report.kept += 1
    report.log()
    return pairs, report


def _has_user_turn(response: Any) -> bool:
    return isinstance(response, list) and any(m.get("role") == "user" for m in response)

