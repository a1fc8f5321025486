"""YAML + ``key=value`` overrides into a typed dataclass, through OmegaConf structured configs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def load_config(schema: type[T], yaml_path: str | Path | Sequence[str | Path] | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Merges the YAML file(s), in order, and the dotted ``key=value`` overrides onto ``schema``'s defaults.

    Unknown keys and values of the wrong type raise ``ValueError`` naming the file or the override.
    """
    merged = OmegaConf.structured(schema)
    paths = [] if yaml_path is None else [yaml_path] if isinstance(yaml_path, (str, Path)) else list(yaml_path)
    for path in paths:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as error:
            raise ValueError(f"{path}: {error}") from error
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as error:
            raise ValueError(f"override {override!r}: {error}") from error
    return OmegaConf.to_object(merged)
