"""Policy answers for AlpacaEval 2 and Arena-Hard-v2.0, written in those tools' input formats (their GPT
judges run elsewhere). Generation uses transformers on an HF export of the policy
(tools/convert_megatron_to_hf.py)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_save.data.loading import field_value, load_rows, require_fields


@dataclass
class GenerationSettings:
    """Sampling settings of the answers."""

    max_new_tokens: int = 1024
    """Longest answer in tokens."""
    temperature: float = 0.0
    """0 for greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling."""
    batch_size: int = 8
    """Prompts per generate call."""


FORMATS = {"alpaca_eval": "instruction", "arena_hard": "prompt"}


def read_prompts(path: str, benchmark: str) -> list[dict]:
    """Rows of an AlpacaEval (``instruction``) or Arena-Hard-v2.0 (``uid``, ``prompt``) prompt file."""
    if benchmark not in FORMATS:
        raise ValueError(f"unknown policy benchmark {benchmark!r}; choose from {sorted(FORMATS)}")
    rows = load_rows(path)
    fields = ("instruction",) if benchmark == "alpaca_eval" else ("uid", "prompt")
    require_fields(rows, fields, path)
    return [{**row, FORMATS[benchmark]: field_value(row, FORMATS[benchmark], i, path)} for i, row in enumerate(rows)]


def generate_answers(model_dir: str | Path, prompts: list[str], settings: GenerationSettings) -> list[tuple[str, int]]:
    """(answer text, answer length in tokens) for each prompt, with the model's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:  # Llama 3 tokenizers have none; left padding with EOS is masked out
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    pad_id = tokenizer.pad_token_id
    answers = []
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc="generating", unit="batch"):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts[start : start + settings.batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} \
            if settings.temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id, **sampling)
        for row in output[:, batch["input_ids"].shape[1]:]:
            tokens = row[: _answer_length(row, {pad_id, tokenizer.eos_token_id})]
            answers.append((tokenizer.decode(tokens, skip_special_tokens=True), int(tokens.numel())))
    return answers


def _answer_length(row: torch.Tensor, stop_ids: set) -> int:
    """Tokens before the first end-of-sequence or padding token."""
    stops = torch.isin(row, torch.tensor(sorted(i for i in stop_ids if i is not None), device=row.device))
    return int(stops.nonzero()[0]) if stops.any() else row.numel()


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
