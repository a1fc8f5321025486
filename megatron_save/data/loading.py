"""Rows from local json / jsonl / parquet files through `datasets`, or from a hub dataset on a cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def check_json_file(path: Path) -> None:
    """Refuses an empty file, bytes that are not UTF-8 and a line that is not JSON, naming the file and line
    (`datasets` would report a generic generation error): a JSON document, or JSON lines."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path}: empty data file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: bytes that are not UTF-8 (at byte {error.start})") from None
    try:
        json.loads(text)
        return
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None


def load_rows(source: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local file (json, jsonl, parquet) or a hub dataset name."""
    import datasets

    path = Path(source)
    if path.suffix in _FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such data file")
        if _FORMATS[path.suffix] == "json":
            check_json_file(path)
        elif path.stat().st_size == 0:
            raise ValueError(f"{source}: empty data file")
        try:
            return datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; the file is what the user needs
            raise ValueError(f"{source}: cannot be read as {_FORMATS[path.suffix]} ({error})") from error
    if path.exists():
        raise ValueError(f"{source}: unsupported data file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
    return datasets.load_dataset(source, split=split)


def require_fields(rows: Any, fields: Iterable[str], source: str) -> None:
    """Raises ValueError naming the file and the missing field."""
    columns = set(rows.column_names)
    for field in fields:
        if field not in columns:
            raise ValueError(f"{source}: rows have no {field!r} field (fields: {sorted(columns)})")


def field_value(row: dict, field: str, index: int, source: str) -> Any:
    """``row[field]``; ValueError naming the file, row and field when it is null."""
    value = row.get(field)
    if value is None:
        raise ValueError(f"{source}: row {index} has no value for {field!r}")
    return value


def chat_value(row: dict, field: str, index: int, source: str) -> Any:
    """``row[field]`` as a prompt or response: a string, or chat messages (a list of {"role", "content"} with
    string values); ValueError naming the file, row and field otherwise."""
    value = field_value(row, field, index, source)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in value):
        return value
    raise ValueError(f"{source}: row {index}, field {field!r}: expected a string or chat messages (a list of "
                     f"{{'role': str, 'content': str}}), got {type(value).__name__} {str(value)[:80]!r}")
