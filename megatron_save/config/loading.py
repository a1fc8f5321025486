"""YAML + ``key=value`` overrides into a typed dataclass, through OmegaConf structured configs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from megatron_save.config.describe import did_you_mean

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or value that cannot be loaded: one line naming it (and the closest valid keys)."""


def _one_line(source: str, error: OmegaConfBaseException, schema: type) -> ConfigError:
    """OmegaConf's several-line message as one line: the source, the dotted key, what is wrong with it."""
    key = getattr(error, "full_key", None)
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)) and key:
        hint = did_you_mean(key, schema) or " (see --help for the settings)"
        return ConfigError(f"{source}: unknown setting {key}{hint}")
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"{source}: {message}" + (f" (setting {key})" if key else ""))


def _read_yaml(path: str | Path):
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({where}{problem})") from error


def merge_config(schema: type, yaml_path: str | Path | Sequence[str | Path] | None = None,
                 overrides: Sequence[str] = ()) -> DictConfig:
    """``schema``'s defaults with the YAML file(s), in order, and the dotted ``key=value`` overrides merged on;
    not yet checked for missing required settings (``--print-config`` shows it as it is)."""
    merged = OmegaConf.structured(schema)
    paths = [] if yaml_path is None else [yaml_path] if isinstance(yaml_path, (str, Path)) else list(yaml_path)
    for path in paths:
        loaded = _read_yaml(path)
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as error:
            raise _one_line(str(path), error, schema) from error
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as error:
            raise _one_line(f"override {override!r}", error, schema) from error
    return merged


def load_config(schema: type[T], yaml_path: str | Path | Sequence[str | Path] | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Merges the YAML file(s), in order, and the dotted ``key=value`` overrides onto ``schema``'s defaults.

    A missing or unparsable file, an unknown key, a value of the wrong type or a required setting left unset
    raise ``ConfigError`` (a ``ValueError``) in one line naming the file or the override and the setting.
    """
    merged = merge_config(schema, yaml_path, overrides)
    try:
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as error:
        raise ConfigError(f"missing required setting {error.full_key} (set it in a YAML file or as "
                          f"{error.full_key}=...)") from error
    except OmegaConfBaseException as error:
        raise _one_line("config", error, schema) from error
