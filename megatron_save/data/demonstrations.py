"""Demonstrations (prompt, response) tokenized for supervised fine-tuning, with counted skips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_save.data.chat import conversation, encode_conversation, encode_prompt, response_text
from megatron_save.data.loading import chat_value, load_rows, require_fields
from megatron_save.data.preference import LoadReport


@dataclass
class Demonstration:
    """One tokenized demonstration: the prompt with the generation prompt, then the response and its end token."""

    ids: list[int]
    """Token ids of the whole rendered conversation."""
    prompt_length: int
    """Tokens of the prompt and generation prompt: the loss covers ids[prompt_length:]."""


def load_demonstrations(source: str, tokenizer: Any, max_length: int, split: str = "train"
                        ) -> tuple[list[Demonstration], LoadReport]:
    """Tokenizes ``prompt`` / ``response`` rows (strings, or chat messages) with the tokenizer's chat template.

    Missing fields raise ValueError naming the file and row; empty responses and conversations longer than
    ``max_length`` tokens are skipped and counted. A template whose rendered prompt is not a prefix of the rendered
    conversation is refused: the loss would cover the wrong tokens.
    """
    rows = load_rows(source, split)
    require_fields(rows, ("prompt", "response"), source)
    report = LoadReport(source)
    demonstrations = []
    for index, row in enumerate(rows):
        report.rows += 1
        prompt, response = chat_value(row, "prompt", index, source), chat_value(row, "response", index, source)
        if not response_text(response).strip():
            report.skipped["empty response"] += 1
            continue
        prompt_ids = encode_prompt(tokenizer, prompt)
        ids = encode_conversation(tokenizer, conversation(prompt, response))
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{source}: row {index}: the chat template renders the prompt differently inside the "
                             "conversation; the response tokens cannot be located")
        if len(ids) > max_length:
            report.skipped[f"longer than {max_length} tokens"] += 1
            continue
        demonstrations.append(Demonstration(ids, len(prompt_ids)))
        report.kept += 1
    report.log()
    return demonstrations, report
