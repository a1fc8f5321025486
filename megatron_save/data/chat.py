"""Conversations rendered with the tokenizer's chat template, as reward-bench renders them for scoring."""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]


def prompt_messages(prompt: str | Messages) -> Messages:
    """A prompt given as a string or as chat messages -> chat messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def conversation(prompt: str | Messages | None, response: str | Messages) -> Messages:
    """The scored conversation: the prompt's messages then the assistant response.

    ``response`` may be a string, or messages: a whole conversation (when it has a user turn, as in datasets that
    store ``chosen`` as the full chat) or the assistant turn(s) to append to the prompt.
    """
    if isinstance(response, str):
        return prompt_messages(prompt or []) + [{"role": "assistant", "content": response}]
    if any(message.get("role") == "user" for message in response):
        return list(response)
    return prompt_messages(prompt or []) + list(response)


def response_text(response: str | Messages, role: str = "assistant") -> str:
    """The text of a response's ``role`` turns (a prompt's with role="user"), for emptiness checks; a string is
    its own text."""
    if isinstance(response, str):
        return response
    return "".join(m.get("content") or "" for m in response if m.get("role") == role)


def _drop_duplicated_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """The template writes BOS and the tokenizer adds another: keep one, as reward-bench does."""
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos else ids


def encode_conversation(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of the rendered conversation without a generation prompt, as reward-bench scores it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return _drop_duplicated_bos(tokenizer, tokenizer(text)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: str | Messages) -> list[int]:
    """Token ids of the prompt followed by the generation prompt: the prefix a response continues."""
    text = tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    return _drop_duplicated_bos(tokenizer, tokenizer(text)["input_ids"])
