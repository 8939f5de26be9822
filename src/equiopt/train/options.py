"""Run options declared once, as dataclass fields, and the command line generated from them.

Every option of ``equiopt train / compare / sweep`` is a field of a config dataclass
(:class:`~equiopt.train.config.TrainConfig`, :class:`~equiopt.train.data.DataConfig`,
:class:`~equiopt.train.config.RunOptions`, ...) declared with :func:`option`, which records
its help text and how the command line spells and parses it. :func:`add_dataclass_options`
turns the fields into argparse arguments (type, default and help from the field) and
:func:`from_namespace` builds the dataclass back from the parsed arguments, so a field
added to a config is on the command line with no further code. Validation lives in the
dataclasses' ``__post_init__`` (API users get it too); its errors name the field and flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: Iterable | Callable[[], Iterable] | None = None,
    metavar: str | None = None,
    group: str | None = None,
    cli: bool = True,
    hidden: bool = False,
    repeat: bool = False,
    default_factory: Callable[[], Any] | Any = _MISSING,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``help``: the option's documentation (``%`` needs no escaping; the default is appended).
    ``flag``: the option's name when it is not ``--field-name``. ``parse``: str -> value for
    types argparse cannot convert itself (lists, dicts, checked numbers). ``choices``: the
    allowed values (or a function returning them). ``group``: the ``--help`` section.
    ``cli=False``: API only; ``hidden=True``: accepted but not listed in ``--help``;
    ``repeat=True``: a list field, the option given once per item.
    """
    meta = {
        "help": help,
        "flag": flag,
        "parse": parse,
        "choices": choices,
        "metavar": metavar,
        "group": group,
        "cli": cli,
        "hidden": hidden,
        "repeat": repeat,
    }
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option_name(cls: type, name: str) -> str:
    """``"grad_clip (--grad-clip)"``: how an error message names a field of ``cls``."""
    f = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    return f"{name} ({flag_of(f)})" if f is not None and f.metadata.get("cli", True) else name


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_show(x) for x in v)
    if isinstance(v, dict):
        return ",".join(f"{k}={_show(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _argument(f: dataclasses.Field, typ: Any, default: Any) -> tuple[list[str], dict]:
    """(flags, keyword arguments) of ``add_argument`` for field ``f``."""
    m = f.metadata
    kw: dict[str, Any] = {"dest": f.name, "default": default}
    help_ = m["help"].replace("%", "%%")
    if default not in (None, "", [], {}) and typ is not bool:
        help_ += f" (default {_show(default).replace('%', '%%')})"
    elif typ is bool:
        help_ += f" (default {'on' if default else 'off'})"
    kw["help"] = argparse.SUPPRESS if m["hidden"] else help_
    if typ is bool:
        kw["action"] = argparse.BooleanOptionalAction
        return [flag_of(f)], kw
    choices = m["choices"]
    if callable(choices):
        choices = choices()
    if choices is not None:
        kw["choices"] = list(choices)
    if m["repeat"]:
        kw["action"] = "append"
        help_ += " (repeatable)"
        kw["help"] = argparse.SUPPRESS if m["hidden"] else help_
    if m["parse"] is not None:
        kw["type"] = m["parse"]
    elif typ in (int, float, str):
        kw["type"] = typ
    elif typing.get_origin(typ) in (typing.Union, getattr(types, "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        kw["type"] = args[0] if len(args) == 1 and args[0] in (int, float, str) else str
    else:
        raise TypeError(f"option {f.name}: type {typ!r} needs parse= in its option()")
    if m["metavar"]:
        kw["metavar"] = m["metavar"]
    return [flag_of(f)], kw


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    defaults: dict | None = None,
    exclude: Iterable[str] = (),
    groups: dict | None = None,
) -> None:
    """Add an argument for every command-line field of ``cls`` (nested dataclasses recursively).

    ``defaults``: per-command default overrides by field name (nested fields included);
    ``exclude``: field names left off this command."""
    defaults, exclude = defaults or {}, set(exclude)
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        typ = hints[f.name]
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):  # a hint is a class, not an instance
            add_dataclass_options(parser, typ, defaults=defaults, exclude=exclude, groups=groups)
            continue
        title = f.metadata.get("group")
        target = parser
        if title:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        flags, kw = _argument(f, typ, defaults.get(f.name, _default(f)))
        target.add_argument(*flags, **kw)


def from_namespace(cls: type, ns: argparse.Namespace, **fields: Any) -> Any:
    """Build ``cls`` from parsed arguments (fields absent from ``ns`` keep their defaults;
    ``fields`` win over both). Runs the dataclass's validation."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in fields:
            kw[f.name] = fields[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            kw[f.name] = from_namespace(hints[f.name], ns)
        elif hasattr(ns, f.name) and f.metadata.get("cli", True):
            kw[f.name] = getattr(ns, f.name)
    return cls(**kw)


# ----------------------------------------------------------------------------- parsers


def csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def float_list(s: str) -> list[float]:
    try:
        return [float(x) for x in csv_list(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def role_floats(s: str) -> dict[str, float]:
    """'embedding=2,router=0.5' -> {'embedding': 2.0, 'router': 0.5}."""
    out = {}
    for item in csv_list(s):
        k, sep, v = item.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected ROLE=NUMBER[,ROLE=NUMBER...], got {s!r}")
    return out


def int_overrides(s: str) -> dict[str, int]:
    """'hidden_size=256,num_layers=6' -> {'hidden_size': 256, 'num_layers': 6}."""
    out = {}
    for item in csv_list(s):
        k, sep, v = item.partition("=")
        if not sep or not v.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"expected KEY=INT[,KEY=INT...], got {s!r}")
        out[k.strip()] = int(v)
    return out


def role_grid(s: str) -> tuple[str, list[float]]:
    """'embedding=0.5,2' -> ('embedding', [0.5, 2.0])."""
    role, sep, vals = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected ROLE=X,Y,..., got {s!r}")
    return role.strip(), float_list(vals)


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v
