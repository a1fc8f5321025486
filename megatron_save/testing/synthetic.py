"""Small synthetic datasets with a known right answer, written as the files users would bring."""

from __future__ import annotations

import json
import random
from pathlib import Path

_VOWELS = "aeiou"
_CONSONANTS = "bcdfghjklmnpqrstvwxz"


def _word(rng: random.Random, letters: str, length: int) -> str:
    return "".join(rng.choice(letters) for _ in range(length))


def _response(rng: random.Random, good: bool) -> str:
    """Good responses are mostly vowels, bad ones mostly consonants: a rule a tiny model learns in steps."""
    main, other = (_VOWELS, _CONSONANTS) if good else (_CONSONANTS, _VOWELS)
    return " ".join(_word(rng, main, rng.randint(2, 4)) + rng.choice(other) for _ in range(rng.randint(2, 4)))


def synthetic_preference_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows of {"prompt", "chosen", "rejected"} where the chosen response follows the hidden rule."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = "say " + _word(rng, _VOWELS + _CONSONANTS, rng.randint(3, 6))
        rows.append({"prompt": prompt, "chosen": _response(rng, True), "rejected": _response(rng, False)})
    return rows


def synthetic_response_groups(count: int, responses_per_prompt: int, seed: int = 0) -> list[dict]:
    """Rows of {"prompt", "responses"} for stage 2; prompts differ in how good their responses tend to be."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        quality = rng.random()
        prompt = ("kind " if quality > 0.5 else "harsh ") + _word(rng, _VOWELS + _CONSONANTS, rng.randint(3, 6))
        responses = [_response(rng, rng.random() < quality) for _ in range(responses_per_prompt)]
        rows.append({"prompt": prompt, "responses": responses})
    return rows


def synthetic_prompts(count: int, seed: int = 0) -> list[dict]:
    """Rows of {"prompt"} for RL (stage 3), drawn like the prompts of ``synthetic_response_groups``."""
    return [{"prompt": row["prompt"]} for row in synthetic_response_groups(count, 1, seed)]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Writes rows as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
