"""Prompts with K sampled responses each (stage 2's value-anchor data), tokenized, with counted skips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_save.data.chat import conversation, encode_conversation, encode_prompt
from megatron_save.data.loading import chat_value, field_value, load_rows, require_fields
from megatron_save.data.preference import LoadReport


@dataclass
class ResponseGroup:
    """One prompt and its sampled responses, tokenized."""

    prompt_ids: list[int]
    """Prompt followed by the generation prompt: V(x) is read at its last token."""
    sequence_ids: list[list[int]]
    """Prompt + response for each kept response: R(x, y) is read at each one's last token."""


def load_response_groups(
    source: str, tokenizer: Any, max_length: int, split: str = "train"
) -> tuple[list[ResponseGroup], LoadReport]:
    """Tokenizes ``prompt`` / ``responses`` rows (``responses``: a list of strings).

    Missing fields raise ValueError naming the file and row. Empty and over-length responses are skipped and
    counted; a prompt left with no response is skipped and counted.
    """
    rows = load_rows(source, split)
    require_fields(rows, ("prompt", "responses"), source)
    report = LoadReport(source)
    groups = []
    for index, row in enumerate(rows):
        report.rows += 1
        prompt = chat_value(row, "prompt", index, source)
        responses = field_value(row, "responses", index, source)
        if not isinstance(responses, list):
            raise ValueError(f"{source}: row {index}: 'responses' must be a list of strings")
        prompt_ids = encode_prompt(tokenizer, prompt)
        sequences = []
        for response in responses:
            if not isinstance(response, str) or not response.strip():
                report.skipped["empty response"] += 1
                continue
            ids = encode_conversation(tokenizer, conversation(prompt, response))
            if len(ids) > max_length:
                report.skipped[f"response longer than {max_length} tokens"] += 1
                continue
            if ids[: len(prompt_ids)] != prompt_ids:
                # V is fitted on the prompt alone but read at the prompt's last token inside full conversations:
                # that is only the same hidden state when the prompt's tokens are a prefix of the conversation's.
                report.skipped["prompt tokens not a prefix of the conversation"] += 1
                continue
            sequences.append(ids)
        if not sequences:
            report.skipped["prompt without a usable response"] += 1
            continue
        groups.append(ResponseGroup(prompt_ids=prompt_ids, sequence_ids=sequences))
        report.kept += 1
    report.log()
    return groups, report
