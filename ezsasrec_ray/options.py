"""One definition of every option: a config dataclass field, with its help and limits.

A stage's config dataclass declares each option once, with :func:`option`::

    @dataclass
    class TrainConfig:
        epochs: int = option(20, "passes over the data", min=1)
        loss: str = option("softmax", "training loss", choices=("bce", "softmax"))
        use_gpu: bool = option(False, "train on GPUs")

        def __post_init__(self):
            check_instance(self)  # types, choices and limits, naming --epochs etc.

and everything else is derived from it: :func:`add_arguments` makes the argparse flags
(types, choices, defaults shown in ``--help``), :func:`check_values` checks a YAML section,
:func:`from_namespace` builds the config from parsed arguments, :func:`yaml_example` and
:func:`markdown_table` write the documentation. Standard library only.

Supported annotations: ``int``, ``float``, ``str``, ``bool``, ``list[X]`` / ``tuple[X, ...]``
of those (``nargs="+"`` on the command line), ``Any``, and unions of these with ``None``.
Other annotations are accepted unchecked and need ``cli=False``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
import re
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import EzSASRecError

OPTION_KEY = "option"  # the key of a field's metadata holding its :class:`Option`


@dataclasses.dataclass(frozen=True)
class Option:
    """What :func:`option` records in a field's metadata."""

    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    flag: str | None = None  # default: --field-name
    cli: bool = True  # False: no command-line flag
    metavar: str | None = None
    yaml: bool = True  # False: not a key of a config file section


_PLAIN = Option()


def option(default, help: str, *, choices: Iterable | None = None, min: float | None = None,
           max: float | None = None, flag: str | None = None, cli: bool = True,
           metavar: str | None = None, yaml: bool = True) -> Any:
    """A dataclass field with a default, a one-line help and the limits its values must meet.

    Pass ``dataclasses.MISSING`` as ``default`` for a required option.
    """
    opt = Option(help=help, choices=None if choices is None else tuple(choices), min=min,
                 max=max, flag=flag, cli=cli, metavar=metavar, yaml=yaml)
    if default is not dataclasses.MISSING:
        problem = _limit_problem(default, opt)
        if problem:
            raise ValueError(f"option default {default!r}: {problem}")
    return dataclasses.field(default=default, metadata={OPTION_KEY: opt})


# --------------------------------------------------------------------------------------------
# Reading annotations

_SCALARS = (bool, int, float, str)
_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


@dataclasses.dataclass(frozen=True)
class _Type:
    """The values an annotation allows."""

    scalars: tuple[type, ...] = ()  # of _SCALARS
    item: type | None = None  # a non-empty list of this scalar
    optional: bool = False  # None allowed
    anything: bool = False  # Any
    checked: bool = True  # False: a part this module does not know; values are not checked

    def describe(self, null: str) -> str:
        parts = [_NAMES[s] for s in self.scalars]
        parts += [f"a list of {_PLURALS[self.item]}"] if self.item else []
        parts += [null] if self.optional else []
        return " or ".join(parts)


def _read_type(annotation) -> _Type:
    if annotation is Any:
        return _Type(optional=True, anything=True, checked=False)
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    scalars, item, optional, checked = [], None, False, True
    for arg in typing.get_args(annotation) if union else (annotation,):
        elements = typing.get_args(arg)
        if arg is type(None):
            optional = True
        elif arg in _SCALARS:
            scalars.append(arg)
        elif (typing.get_origin(arg) in (list, tuple) and elements[:1] != ()
              and elements[0] in _SCALARS and elements[1:] in ((), (Ellipsis,))):
            item = elements[0]
        else:
            checked = False
    return _Type(tuple(scalars), item, optional, checked=checked)


def _is(value, scalar: type) -> bool:
    """isinstance, where a bool is not a number and an int is a float."""
    if scalar is bool or isinstance(value, bool):
        return scalar is bool and isinstance(value, bool)
    return isinstance(value, {int: numbers.Integral, float: numbers.Real, str: str}[scalar])


def _matches(value, t: _Type) -> bool:
    if value is None:
        return t.optional
    if any(_is(value, s) for s in t.scalars):
        return True
    return bool(t.item and isinstance(value, (list, tuple)) and value
                and all(_is(v, t.item) for v in value))


def _normalize(value, t: _Type):
    """The conversions a config file needs: a number for a string option becomes its text
    (a column by position), ``1e-3`` (a string to YAML 1.1) a float, a single value a list."""
    if not t.checked or _matches(value, t):
        return value
    if str in t.scalars and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    if float in t.scalars and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if t.item and _is(value, t.item):
        return [value]
    return value


def _limit_problem(value, opt: Option) -> str | None:
    """Why ``value`` breaks the option's choices or bounds (each item of a list), or None."""
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if v is None:
            continue
        if opt.choices is not None and v not in opt.choices:
            return f"must be one of {', '.join(map(str, opt.choices))}; got {value!r}"
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            continue
        if opt.min is not None and v < opt.min:
            return f"must be >= {opt.min}, got {value!r}"
        if opt.max is not None and v > opt.max:
            return f"must be <= {opt.max}, got {value!r}"
    return None


def _checked(value, t: _Type, opt: Option, name: str, null: str):
    """``value`` normalized, or a one-line EzSASRecError naming ``name``."""
    value = _normalize(value, t)
    if t.checked and not _matches(value, t):
        raise EzSASRecError(f"{name} must be {t.describe(null)}, got {value!r}")
    problem = _limit_problem(value, opt)
    if problem:
        raise EzSASRecError(f"{name} {problem}")
    return value


# --------------------------------------------------------------------------------------------
# Fields


def _option_of(f: dataclasses.Field) -> Option:
    return f.metadata.get(OPTION_KEY, _PLAIN)


def _fields(cls) -> list[tuple[dataclasses.Field, Option, _Type]]:
    """The init fields of ``cls`` with their Option and annotation."""
    hints = typing.get_type_hints(cls)
    return [(f, _option_of(f), _read_type(hints[f.name]))
            for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field: its ``flag``, else ``--field-name``."""
    return _option_of(f).flag or "--" + f.name.replace("_", "-")


def defaults(cls) -> dict:
    """Field name -> default, for the fields that have one (factories are called)."""
    return {f.name: d for f, _, _ in _fields(cls)
            if (d := _default(f)) is not dataclasses.MISSING}


def yaml_keys(cls) -> tuple[str, ...]:
    """The keys a config file section for ``cls`` may hold, in field order."""
    return tuple(f.name for f, opt, _ in _fields(cls) if opt.yaml)


# --------------------------------------------------------------------------------------------
# Command line


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _help(text: str, default) -> str:
    """The help line, ``%``-escaped for argparse, ending with the default when there is one."""
    text = text.replace("%", "%%")
    if default is None or default is dataclasses.MISSING:
        return text
    suffix = f"(default: {_show(default)})".replace("%", "%%")
    return f"{text} {suffix}" if text else suffix


def _cli_type(t: _Type, where: str) -> tuple[type, str | None]:
    """The argparse type and nargs: a single value when the annotation allows one."""
    if len(t.scalars) == 1:
        return t.scalars[0], None
    if (str in t.scalars or t.anything) and bool not in t.scalars:
        return str, None
    if t.item and not t.scalars:
        return t.item, "+"
    raise TypeError(f"{where}: no command-line type for this annotation; use cli=False")


def _converter(scalar: type, opt: Option):
    """``scalar`` as an argparse type, also checking the option's bounds."""
    if opt.min is None and opt.max is None:
        return scalar

    def convert(text: str):
        value = scalar(text)  # a ValueError reads "invalid int value: 'x'"
        problem = _limit_problem(value, dataclasses.replace(opt, choices=None))
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = scalar.__name__
    return convert


def add_arguments(parser, cls, *, skip: Sequence[str] = (), positional: Sequence[str] = (),
                  only: Sequence[str] | None = None) -> None:
    """Add one argument per field of ``cls`` to an argparse parser or group, in field order.

    Options without a default are required (positional when named in ``positional``); fields
    with ``cli=False``, in ``skip``, not in ``only`` (when given), or with a
    ``default_factory`` and no :func:`option` metadata are left out.
    """
    for f, opt, t in _fields(cls):
        if (not opt.cli or f.name in skip or (only is not None and f.name not in only)
                or (f.default_factory is not dataclasses.MISSING and OPTION_KEY not in f.metadata)):
            continue
        where = f"{cls.__name__}.{f.name}"
        default = _default(f)
        kwargs: dict[str, Any] = {"help": opt.help}
        if t.scalars == (bool,) and not t.item:
            if f.name in positional:
                raise TypeError(f"{where}: a boolean cannot be positional")
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if opt.metavar or (opt.flag and opt.choices is None):  # --k K, not --k KS
                kwargs["metavar"] = opt.metavar or opt.flag.lstrip("-").replace("-", "_").upper()
            scalar, nargs = _cli_type(t, where)
            kwargs["type"] = _converter(scalar, opt)
            if nargs:
                kwargs["nargs"] = nargs
            if opt.choices is not None:
                kwargs["choices"] = opt.choices
        if f.name in positional:
            if default is not dataclasses.MISSING:
                kwargs.update(default=default, nargs="*" if kwargs.get("nargs") else "?")
            action = parser.add_argument(f.name, **kwargs)
        else:
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
            action = parser.add_argument(flag_of(f), dest=f.name, **kwargs)
        # Set after construction: Python 3.10's BooleanOptionalAction appends its own default.
        action.help = _help(opt.help, default)


def from_namespace(cls, namespace: argparse.Namespace, **overrides):
    """``cls`` built from the parsed arguments that are its fields, then ``overrides``."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {k: v for k, v in vars(namespace).items() if k in names}
    return cls(**{**kwargs, **overrides})


# --------------------------------------------------------------------------------------------
# Checking values


def check_values(cls, values: dict, *, source: str) -> dict:
    """Check a config file section against ``cls``: known keys, types (a bool is not an int;
    an int is a float; null only for optional fields), choices and bounds. Normalizes the
    values in place (see :func:`_normalize`) and returns ``values``. Messages name
    ``{source}.{key}``, so pass e.g. ``source="pipeline.yaml: train"``."""
    if not isinstance(values, dict):
        raise EzSASRecError(f"{source}: expected a mapping of keys, got {values!r}")
    fields = {f.name: (opt, t) for f, opt, t in _fields(cls)}
    known = yaml_keys(cls)
    for key in list(values):
        if key not in known:
            what = "cannot be set here" if key in fields else "unknown key"
            message = f"{key!r} {what}" if key in fields else f"{what} {key!r}"
            raise EzSASRecError(f"{source}: {message}; known: {', '.join(known)}")
        opt, t = fields[key]
        values[key] = _checked(values[key], t, opt, f"{source}.{key}", null="null")
    return values


def check_instance(obj, *, prefix: str = "--") -> None:
    """The checks of :func:`check_values` on a constructed config (call it first in
    ``__post_init__``). Messages name the command-line flag (``--epochs must be >= 1, got
    0``); with another ``prefix`` they name ``{prefix}{field_name}``. Normalized values are
    set back on ``obj`` (frozen dataclasses too)."""
    for f, opt, t in _fields(type(obj)):
        name = flag_of(f) if prefix == "--" else prefix + f.name
        value = getattr(obj, f.name)
        checked = _checked(value, t, opt, name, null="None")
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


# --------------------------------------------------------------------------------------------
# Documentation


_YAML_WORDS = {"null", "true", "false", "yes", "no", "on", "off", "y", "n", "~"}


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)  # YAML 1.1 (PyYAML) reads 1e-05 as a string; 1.0e-05 is a float
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_yaml_value, value)) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w.-]*", value) and value.lower() not in _YAML_WORDS
        return value if plain else json.dumps(value)  # JSON strings are YAML strings
    return str(value)


def yaml_example(cls, *, indent: int = 2) -> str:
    """The keys of a config file section with their defaults, each under its help comment."""
    pad = " " * indent
    lines = []
    for f, opt, _ in _fields(cls):
        if not opt.yaml:
            continue
        default = _default(f)
        if opt.help:
            lines.append(f"{pad}# {opt.help}")
        value = "  # required" if default is dataclasses.MISSING else " " + _yaml_value(default)
        lines.append(f"{pad}{f.name}:{value}")
    return "\n".join(lines) + "\n"


def markdown_table(cls) -> str:
    """A Markdown table of the command-line options: flag, default, help."""
    rows = ["| option | default | description |", "| --- | --- | --- |"]
    for f, opt, _ in _fields(cls):
        if opt.cli:
            default = _default(f)
            shown = "required" if default is dataclasses.MISSING else f"`{_show(default)}`"
            rows.append(f"| `{flag_of(f)}` | {shown} | {opt.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
