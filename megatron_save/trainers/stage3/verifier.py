"""``reward.verifier``: a program that grades a response in [0, 1] (a task's ground truth). PRIME's labels can come
from it (reward.prime.labels=verifier), and the verifier_hl_bt strategy ranks each group by it."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from megatron_save.trainers.stage3.groups import RolloutGroups

Verifier = Callable[[str, str], float]


def load_verifier(spec: str) -> Verifier:
    """The function named by ``module:function`` (reward.verifier)."""
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward.verifier={spec!r}: cannot load it ({error})") from error
    if not callable(function):
        raise ValueError(f"reward.verifier={spec!r} is not callable")
    return function


def verifier_grades(verifier: Verifier, groups: RolloutGroups, tokenizer: Any) -> torch.Tensor:
    """[B, G] the verifier's grade of every valid response (its prompt is the last user turn), 0 elsewhere;
    refuses a grade outside [0, 1], naming the prompt."""
    grades = torch.zeros(groups.valid.shape)
    for b, g in groups.valid.nonzero().tolist():
        prompt = next(m["content"] for m in reversed(groups.prompts[b]) if m["role"] == "user")
        grade = float(verifier(prompt, tokenizer.decode(groups.policy_response_ids[b][g], skip_special_tokens=True)))
        if not 0.0 <= grade <= 1.0:
            raise ValueError(f"reward.verifier gave {grade} for prompt {prompt!r}; grades must be in [0, 1]")
        grades[b, g] = grade
    return grades
