"""Rows from local json / jsonl / parquet files through `datasets`, or from a hub dataset on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_rows(source: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local file (json, jsonl, parquet) or a hub dataset name."""
    import datasets

    path = Path(source)
    if path.suffix in _FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such data file")
        return datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
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
