"""Policy answers for AlpacaEval 2 and Arena-Hard-v2.0, written in those tools' input formats (their GPT
judges run elsewhere). Generation uses the transformers rollout engine on an HF export of the policy
(tools/convert_megatron_to_hf.py)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_save.data.chat import encode_prompt
from megatron_save.data.loading import field_value, load_rows, require_fields
from megatron_save.rollout import SamplingSettings, TransformersRolloutEngine


FORMATS = {"alpaca_eval": "instruction", "arena_hard": "prompt"}


def read_prompts(path: str, benchmark: str) -> list[dict]:
    """Rows of an AlpacaEval (``instruction``) or Arena-Hard-v2.0 (``uid``, ``prompt``) prompt file."""
    if benchmark not in FORMATS:
        raise ValueError(f"unknown policy benchmark {benchmark!r}; choose from {sorted(FORMATS)}")
    rows = load_rows(path)
    fields = ("instruction",) if benchmark == "alpaca_eval" else ("uid", "prompt")
    require_fields(rows, fields, path)
    return [{**row, FORMATS[benchmark]: field_value(row, FORMATS[benchmark], i, path)} for i, row in enumerate(rows)]


def generate_answers(
    engine: TransformersRolloutEngine, prompts: list[str], sampling: SamplingSettings, batch_size: int = 8
) -> list[tuple[str, int]]:
    """(answer text, answer length in tokens) for each prompt, from the transformers rollout engine of the policy
    with its chat template; ``sampling.n`` must be 1."""
    if sampling.n != 1:
        raise ValueError(f"one answer per prompt: sampling.n must be 1, got {sampling.n}")
    stop_ids = {engine.tokenizer.eos_token_id, *sampling.stop_token_ids}
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch"):
        prompt_ids = [encode_prompt(engine.tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
        for (response,) in engine.generate(prompt_ids, sampling).response_ids:
            answer = response[:-1] if response and response[-1] in stop_ids else response
            answers.append((engine.tokenizer.decode(answer, skip_special_tokens=True), len(answer)))
    return answers


def alpaca_eval_records(rows: list[dict], answers: list[tuple[str, int]], model_name: str) -> list[dict[str, Any]]:
    """AlpacaEval's model_outputs.json entries: instruction, output, generator (and the row's dataset)."""
    return [{"instruction": row["instruction"], "output": answer, "generator": model_name,
             **({"dataset": row["dataset"]} if "dataset" in row else {})} for row, (answer, _) in zip(rows, answers)]


def arena_hard_records(rows: list[dict], answers: list[tuple[str, int]], model_name: str) -> list[dict[str, Any]]:
    """Arena-Hard-v2.0 model_answer/<model>.jsonl entries (uid, ans_id, model, messages, tstamp).

    arena-hard-auto's style control also reads ``metadata`` (a tiktoken token count and markdown counts) that its
    own gen_answer computes; it is left out here rather than filled with numbers counted differently.
    """
    return [{"uid": row["uid"], "ans_id": uuid.uuid4().hex, "model": model_name,
             "messages": [{"role": "user", "content": row["prompt"]},
                          {"role": "assistant", "content": {"answer": answer}}],
             "tstamp": time.time()}
            for row, (answer, _) in zip(rows, answers)]


def write_records(records: list[dict], benchmark: str, out_path: str | Path) -> None:
    """AlpacaEval: one JSON list; Arena-Hard: JSON lines."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if benchmark == "alpaca_eval":
        out_path.write_text(json.dumps(records, indent=2) + "\n")
    else:
        out_path.write_text("".join(json.dumps(record) + "\n" for record in records))
