"""The data products of the paper's recipe (appendix F.1), as functions over rows: which UltraFeedback instructions
to keep by the token length of their completions, which ultrafeedback_binarized pairs belong to them, and the
bookkeeping of a resumable responses file (stage 2's ``{"prompt", "responses"}`` rows).

Row formats (what ``datasets`` yields for one row):

- UltraFeedback (``openbmb/UltraFeedback``): ``{"instruction": str, "completions": [{"response": str, ...}, ...]}``
  (four completions per instruction, each from a different model, with annotations this module ignores).
- ultrafeedback_binarized (``HuggingFaceH4/ultrafeedback_binarized``): ``{"prompt": str, "chosen": Messages,
  "rejected": Messages, ...}``, each message list a whole conversation (the user turn, then the assistant's).
- The selection written by ``tools/select_prompts.py``: ``{"prompt": str}``, what stage 3's ``train_data`` and
  sample-responses' ``prompt_data`` read (``data/prompts.py``; a string prompt is one user turn).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from megatron_save.data.chat import Messages, prompt_messages, response_text
from megatron_save.data.loading import chat_value, field_value
from megatron_save.data.preference import LoadReport
from megatron_save.utils.files import atomic_write_text

LENGTH_RULES = ("any", "all", "mean")
"""How an instruction's completion lengths decide (``--rule``): any one / every one / their mean within bounds."""
TokenCounter = Callable[[list[str]], list[int]]
"""texts [N] -> token counts [N]."""
_CHUNK_ROWS = 256  # rows whose completions are counted in one tokenizer call (fast tokenizers batch in Rust)


@dataclass(frozen=True)
class LengthRule:
    """Which completion lengths keep an instruction (paper F.1: "instructions whose responses exceed 1024 tokens").

    The paper says neither whether one, every or the average completion must exceed the bound, nor which tokenizer
    counts; the default ``any`` is argued in tools/select_prompts.py. ``max_tokens`` serves the other reading of
    F.1 (keep instructions whose responses stay *within* 1024 tokens, the rollout limit of Table 8).
    """

    min_tokens: int | None = 1024
    """A passing length is strictly greater than this (--min-response-tokens); None: no lower bound."""
    max_tokens: int | None = None
    """A passing length is at most this (--max-response-tokens); None: no upper bound."""
    rule: str = "any"
    """any: at least one completion passes; all: every completion passes; mean: the mean length passes."""

    def passes(self, length: float) -> bool:
        """One length (or a mean) inside the bounds."""
        return (self.min_tokens is None or length > self.min_tokens) and (
            self.max_tokens is None or length <= self.max_tokens)

    def describe(self) -> str:
        """E.g. "any completion over 1024 tokens"; names the skip reason in reports."""
        bounds = [f"over {self.min_tokens}" if self.min_tokens is not None else "",
                  f"at most {self.max_tokens}" if self.max_tokens is not None else ""]
        bound = " and ".join(b for b in bounds if b) or "of any length"
        subject = {"any": "any completion", "all": "every completion", "mean": "mean completion length"}[self.rule]
        return f"{subject} {bound} tokens"


def check_length_rule(rule: LengthRule) -> None:
    """Refuses a rule that cannot select anything sensibly, naming the command-line flag."""
    if rule.rule not in LENGTH_RULES:
        raise ValueError(f"--rule {rule.rule!r} is not one of {', '.join(LENGTH_RULES)}")
    for flag, value in (("--min-response-tokens", rule.min_tokens), ("--max-response-tokens", rule.max_tokens)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} {value} must be >= 0")
    if rule.min_tokens is not None and rule.max_tokens is not None and rule.max_tokens <= rule.min_tokens:
        raise ValueError(f"--max-response-tokens {rule.max_tokens} must be greater than --min-response-tokens "
                         f"{rule.min_tokens}: no length passes both")


def lengths_pass(lengths: list[int], rule: LengthRule) -> bool:
    """Whether an instruction's completion lengths [C] (C >= 1) satisfy ``rule``."""
    if rule.rule == "any":
        return any(rule.passes(n) for n in lengths)
    if rule.rule == "all":
        return all(rule.passes(n) for n in lengths)
    return rule.passes(sum(lengths) / len(lengths))


def prompt_key(text: str) -> str:
    """What makes two prompts the same one: their text without leading and trailing whitespace."""
    return text.strip()


def token_counter(tokenizer: Any) -> TokenCounter:
    """Counts each text's tokens on its own (no special tokens, no chat template): the response's length."""
    return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _instruction(row: dict, index: int, source: str) -> str | None:
    """The row's instruction, stripped; None when it is null or blank (skipped and counted)."""
    value = row.get("instruction")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{source}: row {index}, field 'instruction': expected a string, got "
                         f"{type(value).__name__}")
    return prompt_key(value) or None


def _completion_texts(row: dict, index: int, source: str) -> list[str]:
    """The ``response`` of each of the row's completions ([] when there are none)."""
    completions = row.get("completions")
    if completions is None:
        return []
    if not isinstance(completions, list):
        raise ValueError(f"{source}: row {index}, field 'completions': expected a list of {{'response': str, ...}}, "
                         f"got {type(completions).__name__}")
    texts = []
    for number, completion in enumerate(completions):
        response = completion.get("response") if isinstance(completion, dict) else None
        if not isinstance(response, str):
            raise ValueError(f"{source}: row {index}, completion {number}: no 'response' string (got "
                             f"{str(completion)[:80]!r})")
        texts.append(response)
    return texts


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[tuple[int, dict]]]:
    chunk: list[tuple[int, dict]] = []
    for index, row in enumerate(rows):
        chunk.append((index, row))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def select_instructions(rows: Iterable[dict], count_tokens: TokenCounter, rule: LengthRule, source: str,
                        limit: int | None = None) -> tuple[list[str], LoadReport]:
    """UltraFeedback rows -> the distinct instructions (stripped, in first-seen order) whose completions satisfy
    ``rule``, at most ``limit`` of them (reading stops there), and a report of every row read: kept, or skipped by
    reason (empty instruction, no completions, lengths outside the rule, duplicate instruction).

    A row whose instruction is not a string or whose completions are not ``{"response": str}`` dicts raises
    ValueError naming ``source`` and the row.
    """
    check_length_rule(rule)
    report = LoadReport(source)
    selected: list[str] = []
    seen: set[str] = set()
    failing = f"not {rule.describe()}"
    for chunk in _chunks(rows, _CHUNK_ROWS):
        parsed = [(_instruction(row, i, source), _completion_texts(row, i, source)) for i, row in chunk]
        counts = iter(count_tokens([text for _, texts in parsed for text in texts]))
        for instruction, texts in parsed:
            if limit is not None and len(selected) >= limit:
                return selected, report
            lengths = [next(counts) for _ in texts]  # consumed for every row, so later rows stay aligned
            report.rows += 1
            reason = ("empty instruction" if instruction is None else "no completions" if not texts
                      else failing if not lengths_pass(lengths, rule)
                      else "duplicate instruction" if instruction in seen else None)
            if reason is not None:
                report.skipped[reason] += 1
                continue
            seen.add(instruction)
            selected.append(instruction)
            report.kept += 1
    return selected, report


def selection_prompts(rows: Iterable[dict], source: str) -> list[str]:
    """The ``prompt`` strings of a selection file's rows (tools/select_prompts.py's output); a null or non-string
    prompt raises ValueError naming ``source`` and the row."""
    prompts = []
    for index, row in enumerate(rows):
        prompt = field_value(row, "prompt", index, source)
        if not isinstance(prompt, str):
            raise ValueError(f"{source}: row {index}, field 'prompt': expected a string, got {type(prompt).__name__}")
        prompts.append(prompt)
    return prompts


@dataclass
class PairMatchReport(LoadReport):
    """What happened to the preference rows, and which selected prompts found no pair."""

    selected: int = 0
    """Distinct selected prompts."""
    unmatched: list[str] = field(default_factory=list)
    """Selected prompts (stripped) that no kept pair has, in selection order."""


def match_preference_pairs(rows: Iterable[dict], selected: Iterable[str], source: str
                           ) -> tuple[list[dict], PairMatchReport]:
    """ultrafeedback_binarized rows -> ``{"prompt", "chosen", "rejected"}`` rows whose prompt is a selected one
    (equal after stripping whitespace on both sides), in the source's order; every matching row is kept (a prompt
    may have several pairs). Rows with an empty chosen or rejected response are skipped and counted, as stage 1
    would skip them. A null field, or a chosen / rejected that is neither a string nor chat messages, raises
    ValueError naming ``source`` and the row.
    """
    wanted = {prompt_key(p) for p in selected}
    report = PairMatchReport(source, selected=len(wanted))
    matched: set[str] = set()
    pairs = []
    for index, row in enumerate(rows):
        report.rows += 1
        prompt = field_value(row, "prompt", index, source)
        if not isinstance(prompt, str):
            raise ValueError(f"{source}: row {index}, field 'prompt': expected a string, got {type(prompt).__name__}")
        chosen, rejected = chat_value(row, "chosen", index, source), chat_value(row, "rejected", index, source)
        if prompt_key(prompt) not in wanted:
            report.skipped["prompt not selected"] += 1
            continue
        if not response_text(chosen).strip() or not response_text(rejected).strip():
            report.skipped["empty response"] += 1
            continue
        matched.add(prompt_key(prompt))
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        report.kept += 1
    report.unmatched = [p for p in dict.fromkeys(prompt_key(p) for p in selected) if p not in matched]
    return pairs, report


def write_jsonl_file(rows: Iterable[dict], path: str | Path) -> Path:
    """Writes ``rows`` as JSON lines, atomically (a crash leaves the old file or the whole new one); ASCII JSON,
    whatever the locale's encoding."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- stage 2's responses file, written a batch at a time and resumed -------------------------------------------


def messages_key(prompt: str | Messages) -> str:
    """A prompt's identity in a responses file: its chat messages as canonical JSON (a string prompt and the same
    text as one user turn are the same prompt, as every loader renders them alike)."""
    return json.dumps(prompt_messages(prompt), sort_keys=True, ensure_ascii=False)


def stored_prompts(prompts: list[Messages]) -> list[str | Messages]:
    """The prompts as a responses file holds them: strings when every prompt is a lone user turn (a file of
    string prompts), else the messages of every one (an Arrow column, as ``datasets`` loads it, has one type)."""
    lone = all(len(m) == 1 and m[0].get("role") == "user" for m in prompts)
    return [m[0]["content"] for m in prompts] if lone else [list(m) for m in prompts]


def response_row(prompt: str | Messages, responses: list[str], truncated: list[bool]) -> dict:
    """One row of stage 2's data: the prompt, its K response texts, and which of them hit max_new_tokens."""
    return {"prompt": prompt, "responses": responses, "truncated": truncated}


def read_complete_rows(path: str | Path) -> tuple[list[dict], int]:
    """The rows of a JSON-lines file a crash may have cut short, and the byte length of its complete part.

    A line counts once its newline is written: an unterminated last line (a torn write) is left out, and the caller
    truncates the file to the returned length before appending. A terminated line that is not a JSON object is
    not a torn write: ValueError naming the file and line.
    """
    data = Path(path).read_bytes() if Path(path).exists() else b""
    complete = data[: data.rfind(b"\n") + 1]
    rows = []
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error}); fix or remove the line to "
                             "resume") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{path}, line {number}: not a row with a 'prompt'")
        rows.append(row)
    return rows, len(complete)


def pending_indices(prompt_keys: list[str], written_keys: Iterable[str]) -> list[int]:
    """Indices of the prompts [P] still to sample: each written row covers one occurrence of its prompt (a prompt
    listed twice needs two rows), earliest occurrences first."""
    remaining = Counter(written_keys)
    pending = []
    for index, key in enumerate(prompt_keys):
        if remaining[key] > 0:
            remaining[key] -= 1
        else:
            pending.append(index)
    return pending


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Appends whole rows and makes them durable before returning (one write: a crash tears at most the last)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())
