"""Options from one source: dataclass fields that carry their help, checks and flag.

A configuration is a frozen dataclass whose fields are made with :func:`option`.
From the fields alone, :func:`validate` checks an instance (one-line
``ValueError`` naming the field, its command-line flag, what was expected and
what came), :func:`add_arguments` adds the matching ``argparse`` options (type,
default, choices and help text), and :func:`from_arguments` builds the instance
back from the parsed namespace. A new option is therefore one field.

Flags: a field ``batch_size`` is ``--batch-size``; a boolean field defaulting
to ``False`` is the switch ``--name``, one defaulting to ``True`` the switch
``--no-name``; ``flag=`` overrides the name (``lu`` is ``--dense``). A field
holding a nested configuration adds that configuration's options; where a
nested field has the name of one already added (``seed``), the one option sets
both.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "Check",
    "Validated",
    "add_arguments",
    "at_least",
    "between",
    "flag_of",
    "from_arguments",
    "option",
    "validate",
]


class Check(NamedTuple):
    """A test on an option's value and the words for what it expects."""

    test: Callable[[Any], bool]
    expected: str


def at_least(low: float, kind: str = "an integer") -> Check:
    """``value >= low``."""
    return Check(lambda v: v >= low, f"{kind} >= {low}")


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Check:
    """``low <= value < high`` (by default; each end open or closed)."""

    def test(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return Check(test, f"a number in {left}{low}, {high}{right}")


POSITIVE = Check(lambda v: v > 0, "a number > 0")


def option(
    default: Any,
    help: str,  # noqa: A002 - the argparse word
    *,
    flag: str | None = None,
    check: Check | None = None,
    choices: tuple | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    resume: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field with everything the command line and the checks need.

    ``check`` tests the value (every element of a tuple); ``choices`` lists the
    allowed values; ``parse`` turns the command-line text into the value (for
    types argparse cannot infer); ``resume=True`` marks an option that may
    differ when a run is resumed; ``cli=False`` keeps it off the command line.
    """
    meta = dict(
        help=help,
        flag=flag,
        check=check,
        choices=choices,
        parse=parse,
        metavar=metavar,
        resume=resume,
        cli=cli,
    )
    if isinstance(default, list | dict | set):
        raise TypeError("option defaults must be immutable")
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of field ``f``."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    if f.default is True:
        return f"--no-{name}"
    return f"--{name}"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_types(hint: Any) -> tuple[type, ...]:
    """The non-None types of ``X | Y | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for t in typing.get_args(hint) if t is not type(None))
    return (hint,)


def _type_ok(value: Any, hint: Any) -> bool:
    if value is None:
        return type(None) in typing.get_args(hint) or hint is None
    for t in _base_types(hint):
        origin = typing.get_origin(t)
        if origin is tuple:
            (elem, *_) = typing.get_args(t)
            if isinstance(value, tuple) and all(_type_ok(v, elem) for v in value):
                return True
        elif t is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return True
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif isinstance(t, type) and isinstance(value, t):
            return True
    return False


def _describe_type(hint: Any) -> str:
    names = []
    for t in _base_types(hint):
        origin = typing.get_origin(t)
        if origin is tuple:
            names.append(f"a tuple of {typing.get_args(t)[0].__name__}")
        else:
            names.append(getattr(t, "__name__", str(t)))
    if type(None) in typing.get_args(hint):
        names.append("None")
    return " or ".join(names)


class Validated:
    """A base for configuration dataclasses: :func:`validate` on construction."""

    def __post_init__(self) -> None:
        validate(self)


def validate(config: Any) -> None:
    """``ValueError`` for the first field of ``config`` (a dataclass made with
    :func:`option`) whose value has the wrong type, is not one of its choices,
    or fails its check. Nested configurations are checked when they are built."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        where = f"{f.name} ({flag_of(f)})" if f.metadata.get("cli", True) else f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ValueError(f"{where}: expected a {hint.__name__}, got {value!r}")
            continue
        if not _type_ok(value, hint):
            raise ValueError(f"{where}: expected {_describe_type(hint)}, got {value!r}")
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{where}: expected a finite number, got {v!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            listed = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{where}: expected one of {listed}, got {value!r}")
        check = f.metadata.get("check")
        if check is not None and value is not None:
            if isinstance(value, tuple) and not value:
                raise ValueError(f"{where}: expected at least one value, got ()")
            for v in values:
                if not check.test(v):
                    raise ValueError(f"{where}: expected {check.expected}, got {v!r}")


def _parse_number(kind: type) -> Callable[[str], Any]:
    """int / float conversion with argparse's error message on bad text."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None

    parse.__name__ = kind.__name__
    return parse


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    _seen: set[str] | None = None,
) -> None:
    """Add an option for every field of the dataclass ``cls`` (recursing into
    nested configurations). ``defaults`` replaces the shown default of fields
    whose value the command computes (``out_dir``)."""
    hints = _hints(cls)
    own = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}
    seen = set() if _seen is None else _seen
    outer = set(seen)  # added, or to be added, by the enclosing configurations
    seen |= own
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_arguments(parser, hint, defaults=defaults, _seen=seen)
            continue
        if not meta.get("cli", True) or f.name in outer:
            continue
        default = defaults.get(f.name, f.default)
        flag = flag_of(f)
        kwargs: dict[str, Any] = dict(help=meta.get("help", ""))
        if flag.startswith("-"):
            kwargs["dest"] = f.name
        if not flag.startswith("-"):  # a positional argument: required, no default
            kwargs["type"] = meta.get("parse") or _base_types(hint)[0]
        elif hint is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
            kwargs["default"] = f.default
        else:
            base = _base_types(hint)
            parse = meta.get("parse")
            if typing.get_origin(base[0]) is tuple:
                kwargs["nargs"] = "+"
                parse = parse or _parse_number(typing.get_args(base[0])[0])
            elif parse is None and base[0] in (int, float):
                parse = _parse_number(base[0])
            kwargs["type"] = parse or base[0]
            kwargs["default"] = default
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if default is not None:
                kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(flag, **kwargs)


def from_arguments(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """The instance of ``cls`` the parsed ``namespace`` describes; ``overrides``
    set fields directly (and win over the namespace)."""
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(hint):
            values[f.name] = from_arguments(hint, namespace)
        elif f.metadata.get("cli", True) and hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            if isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
    return cls(**values)
