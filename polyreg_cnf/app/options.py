"""The option machinery of the run configuration: declaring a typed option, and reading one.

An option is a field of a frozen dataclass group with a default, a help line and, where it has
them, its choices (from the registry that defines them) and lower bound: :func:`option`
declares one; a component's own config (:class:`~polyreg_cnf.engine.flow_config.FlowConfig`)
carries the same metadata on its fields. :func:`describe` reads a group as :class:`Option`
records, from which :mod:`polyreg_cnf.app.schema` checks values and
:mod:`polyreg_cnf.app.config_io` makes the command line.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     lr: float = option(1e-3, "learning rate", low=0.0, strict=True)
    >>> (spec,) = describe(Demo, "training")
    >>> spec.flag, spec.check(1)
    ('--lr', 1.0)
    >>> spec.check(0)
    Traceback (most recent call last):
    ...
    polyreg_cnf.app.options.ConfigError: --lr must be a finite number > 0, got 0
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from polyreg_cnf.engine.errors import PolyregCNFError

__all__ = ["ConfigError", "Option", "default_of", "describe", "option"]


class ConfigError(PolyregCNFError, ValueError):
    """A run configuration that cannot work (an option's value, or a combination of them)."""


def default_of(owner: Any, name: str) -> Any:
    """The default of argument or field ``name`` of ``owner`` (a class or a function): every
    default of a run is defined once, where the thing it configures is defined."""
    fields = getattr(owner, "__dataclass_fields__", None)
    if fields is not None and name in fields:
        f = fields[name]
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    else:
        value = inspect.signature(owner).parameters[name].default
    return tuple(value) if isinstance(value, list) else value


def option(default: Any, help: str = "", *, choices: Sequence[str] | None = None,
           low: float | None = None, strict: bool = False) -> Any:
    """A configuration field: its default, help text, choices and lower bound.

    Args:
        default: The value when neither a flag, a config file nor a preset gives one.
        help: One line for ``--help``.
        choices: The allowed values of a string option (from the registry that defines them).
        low: Smallest allowed value of a number.
        strict: ``value > low`` instead of ``value >= low``.

    Returns:
        A :func:`dataclasses.field` carrying that metadata.
    """
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "low": low,
            "strict": strict}
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"option defaults must be immutable, got {default!r}")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One field as the command line and the checks see it."""

    name: str
    group: str | None  # attribute of RunConfig holding it (None: a RunConfig field itself)
    kind: type  # bool, int, float, str or tuple (of positive ints)
    optional: bool  # None allowed
    default: Any
    help: str
    choices: tuple[str, ...] | None
    low: float | None
    strict: bool

    @property
    def flag(self) -> str:
        """``--hidden-dims``; ``--no-test`` for a switch that is on by default."""
        stem = self.name.replace("_", "-")
        return f"--no-{stem}" if self.kind is bool and self.default is True else f"--{stem}"

    @property
    def label(self) -> str:
        """How messages name the option: ``--`` plus its name (``--test`` for ``--no-test``)."""
        return f"--{self.name.replace('_', '-')}"

    def expected(self) -> str:
        """What a valid value is, in words."""
        if self.kind is bool:
            return "true or false"
        if self.kind is tuple:
            return "comma-separated positive widths like 64,64,64"
        if self.kind is str:
            return "a string"
        bound = "" if self.low is None else f" {'>' if self.strict else '>='} {self.low:g}"
        if self.kind is int:
            return {" >= 1": "a positive integer"}.get(bound, f"an integer{bound}")
        return f"a finite number{bound}"

    def check(self, value: Any) -> Any:
        """``value`` in this option's type (ints as floats, lists as tuples), or ConfigError."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{self.label} must be {self.expected()}, got None")
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"{self.label}: invalid choice {value!r}; valid: "
                                  f"{', '.join(self.choices)}")
            return value
        ok, converted = self._convert(value)
        if not ok:
            raise ConfigError(f"{self.label} must be {self.expected()}, got {value!r}")
        return converted

    def _convert(self, value: Any) -> tuple[bool, Any]:
        if self.kind is bool:
            return isinstance(value, bool), value
        if self.kind is str:
            return isinstance(value, str), value
        if self.kind is tuple:
            ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            return ok, tuple(value) if ok else value
        number = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            return False, value
        value = self.kind(value)
        if not math.isfinite(value) or (self.low is not None and (
                value < self.low or (self.strict and value == self.low))):
            return False, value
        return True, value

    def parse(self, text: str) -> Any:
        """An argparse ``type``: the flag's text as a checked value."""
        try:
            if self.kind is tuple:
                value: Any = [int(v) for v in text.replace("-", ",").split(",") if v.strip()]
            else:
                value = self.kind(text)
            return self.check(value)
        except (ValueError, ConfigError):
            raise argparse.ArgumentTypeError(f"expected {self.expected()}, got {text!r}") \
                from None


def describe(cls: type, group: str | None) -> Iterator[Option]:
    """The options of dataclass ``cls`` (its fields with a help line), held by ``group``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:  # a group, not an option
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and \
            type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        kind = typing.get_origin(base) or base
        meta = f.metadata
        yield Option(f.name, group, kind, optional, f.default, meta["help"], meta.get("choices"),
                     meta.get("low"), meta.get("strict", False))
