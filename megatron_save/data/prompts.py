"""RL prompts (stage 3): each row's prompt, tokenized for the policy, with counted skips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_save.data.chat import Messages, encode_prompt, prompt_messages
from megatron_save.data.loading import chat_value, load_rows, require_fields
from megatron_save.data.preference import LoadReport


@dataclass
class Prompt:
    """One RL prompt."""

    messages: Messages
    """The prompt as chat messages (the reward model renders it with its own template)."""
    ids: list[int]
    """Policy token ids of the prompt followed by the generation prompt."""


def load_prompts(source: str, tokenizer: Any, max_prompt_length: int, split: str = "train"
                 ) -> tuple[list[Prompt], LoadReport]:
    """Rows with a ``prompt`` field (a string or chat messages), tokenized with the policy's chat template.

    A missing or null prompt raises ValueError naming the file and row; empty prompts and prompts longer than
    ``max_prompt_length`` tokens are skipped and counted.
    """
    rows = load_rows(source, split)
    require_fields(rows, ("prompt",), source)
    report = LoadReport(source)
    prompts = []
    for index, row in enumerate(rows):
        report.rows += 1
        messages = prompt_messages(chat_value(row, "prompt", index, source))
        if not any((m.get("content") or "").strip() for m in messages):
            report.skipped["empty prompt"] += 1
            continue
        ids = encode_prompt(tokenizer, messages)
        if len(ids) > max_prompt_length:
            report.skipped[f"prompt longer than {max_prompt_length} tokens"] += 1
            continue
        prompts.append(Prompt(messages=messages, ids=ids))
        report.kept += 1
    report.log()
    return prompts, report
