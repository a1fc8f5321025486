"""What a config dataclass offers, read from its source: every dotted setting with its type, default and the
one-line docstring written under its field. ``--help`` lists them, the loader suggests the closest ones for an
unknown key, and the docs test checks the docs' overrides against them."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass

from omegaconf import MISSING


@dataclass(frozen=True)
class Setting:
    """One leaf setting of a config: ``key`` is dotted (``reward.optim.lr``)."""

    key: str
    type: str
    default: str
    doc: str


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring, whitespace collapsed to one line} of the string literal under each field of
    ``cls``'s class body (fields without one are left out; a class whose source is unavailable gives {})."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _dataclass_in(hint) -> type | None:
    """The dataclass ``hint`` names, alone or as ``X | None``; else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(members) == 1:
            return _dataclass_in(members[0])
    return None


def _type_name(hint) -> str:
    """``float``, ``str | None``, ``list[int]``, ``Inner | None``: without module prefixes."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(hint))


def _default_of(item: dataclasses.Field):
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return MISSING


def _show(value) -> str:
    if value is MISSING or value == MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def settings_of(schema: type, prefix: str = "", defaults=None) -> list[Setting]:
    """Every leaf setting of the dataclass ``schema``, nested settings flattened to dotted keys, in field order.
    A nested dataclass's defaults are those its parent's default builds (``OptimizerSettings(lr=2e-6)``)."""
    hints = typing.get_type_hints(schema)
    docs = field_docs(schema)
    settings = []
    for item in dataclasses.fields(schema):
        key, hint = f"{prefix}{item.name}", hints[item.name]
        default = _default_of(item) if defaults is None else getattr(defaults, item.name)
        nested = _dataclass_in(hint)
        if nested is not None and default is not None and default is not MISSING:
            settings += settings_of(nested, f"{key}.", default)
        else:
            settings.append(Setting(key, _type_name(hint), _show(default), docs.get(item.name, "")))
    return settings


def setting_keys(schema: type) -> list[str]:
    """The dotted keys of every setting of ``schema`` and of every nested group (``reward``, ``reward.optim``)."""
    keys = []
    for setting in settings_of(schema):
        parts = setting.key.split(".")
        keys += [".".join(parts[:end]) for end in range(1, len(parts))] + [setting.key]
    return list(dict.fromkeys(keys))


def closest_keys(key: str, schema: type, count: int = 3) -> list[str]:
    """Up to ``count`` valid dotted keys of ``schema`` nearest to ``key``: a close name in the same group
    (``reward.stratgy`` -> ``reward.strategy``), then the same name in another group (``reward.lr`` ->
    ``reward.optim.lr``), then a close dotted key anywhere (difflib's ratios)."""
    keys = setting_keys(schema)
    group, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == group}
    close = [siblings[name] for name in difflib.get_close_matches(leaf, list(siblings), n=count, cutoff=0.6)]
    close += [k for name, k in siblings.items() if len(leaf) >= 3 and name.startswith(leaf)]
    ratio = functools.partial(lambda a, b: difflib.SequenceMatcher(None, a, b).ratio(), key)
    close += sorted((k for k in keys if k.rpartition(".")[2] == leaf), key=ratio, reverse=True)
    others = [k for k in keys if k not in siblings.values() and not key.startswith(f"{k}.")]
    close += difflib.get_close_matches(key, others, n=count, cutoff=0.85)
    return list(dict.fromkeys(close))[:count]


def did_you_mean(key: str, schema: type) -> str:
    """`` (did you mean a or b?)`` naming the closest keys, or an empty string when none is close."""
    close = closest_keys(key, schema)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def format_settings(schema: type, width: int = 100) -> str:
    """``--help``'s list: one setting per entry, ``key (type, default): docstring`` wrapped under the key."""
    lines = []
    for setting in settings_of(schema):
        lines.append(f"  {setting.key} ({setting.type}, default {setting.default})")
        if setting.doc:
            lines += textwrap.wrap(setting.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
