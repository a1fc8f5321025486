"""What --help, the loader's suggestions and the docs test read from a config dataclass: its dotted settings with
type, default and the docstring under each field."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from megatron_save.config.describe import Setting, closest_keys, field_docs, format_settings, settings_of


@dataclass
class Inner:
    """Nested."""

    lr: float = 1e-3
    """Learning
    rate, on two lines."""
    steps: int = 1


@dataclass
class Outer:
    """Top."""

    name: str = MISSING
    """Required name."""
    optim: Inner = field(default_factory=lambda: Inner(lr=2e-6))
    """The optimizer."""
    maybe: Inner | None = None
    """An optional group, unset by default."""
    strategy: str = "save"
    """The strategy."""


def test_field_docs_are_the_strings_under_the_fields():
    assert field_docs(Inner) == {"lr": "Learning rate, on two lines."}  # steps has none
    assert field_docs(Outer)["maybe"] == "An optional group, unset by default."


def test_settings_are_flattened_with_the_parents_defaults():
    assert settings_of(Outer) == [
        Setting("name", "str", "(required)", "Required name."),
        Setting("optim.lr", "float", "2e-06", "Learning rate, on two lines."),  # the factory's value, not 1e-3
        Setting("optim.steps", "int", "1", ""),
        Setting("maybe", "Inner | None", "null", "An optional group, unset by default."),
        Setting("strategy", "str", "'save'", "The strategy."),
    ]
    assert format_settings(Outer).splitlines()[:2] == ["  name (str, default (required))", "      Required name."]


def test_closest_keys():
    assert closest_keys("stratgy", Outer) == ["strategy"]
    assert closest_keys("optim.lrr", Outer)[0] == "optim.lr"
    assert closest_keys("lr", Outer) == ["optim.lr"]  # the same name in a group
    assert closest_keys("optm.steps", Outer)[0] == "optim.steps"
    assert closest_keys("no_such", Outer) == []
