"""The command line's setting flags, derived from the settings model (:mod:`valuegate.settings`).

One source of truth: each leaf setting ``<section>.<key>`` is the flag ``--<section>.<key>`` (``_`` → ``-``;
a root setting is ``--<key>``), with the field's type, its choices (a ``Literal``), its description and its
default as help; a few also keep the short spelling of :data:`valuegate.settings.SHORT_FLAGS`
(``--batch-size`` = ``--extract.batch-size``). A setting added to the model gets its flag and help here
without any change to the CLI. Every flag defaults to None (unset), so an unset flag never masks the
config file or a ``VALUEGATE_*`` variable (:func:`valuegate.settings.load_settings` skips None values).

Types: ``bool`` → ``--x`` / ``--no-x``; ``Literal[...]`` → its choices; ``list[str]`` → repeat the flag,
one item each; ``dict[str, str]`` → repeat the flag, one ``KEY=VALUE`` each; ``int``, ``float``, ``str``
(and ``X | None``) → one value of that type.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from valuegate.settings import ENV_PREFIX, SHORT_FLAGS, Choices, Settings, setting_fields


def flag_of(path: tuple[str, ...]) -> str:
    """``("extract", "batch_size")`` → ``--extract.batch-size``: the full flag of a setting."""
    return "--" + ".".join(path).replace("_", "-")


def shown_default(value: Any) -> str:
    """A default as the help shows it, in TOML's words: ``true``, ``16``, ``auto``, ``["a", "b"]``, or
    ``unset`` for None."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def dest_of(path: tuple[str, ...]) -> str:
    """The attribute of the parsed namespace that holds a setting: the short flag's name where the setting
    has one (``args.batch_size``, ``args.runner``: the names the CLI always had), else the dotted key
    (``vars(args)["extract.max_batch_tokens"]``)."""
    dotted = ".".join(path)
    short = SHORT_FLAGS.get(dotted)
    return short[2:].replace("-", "_") if short else dotted


def _default(field: FieldInfo) -> Any:
    return field.get_default(call_default_factory=True)


def _argument(path: tuple[str, ...], field: FieldInfo) -> tuple[list[str], dict[str, Any]]:
    """The option strings and ``add_argument`` keywords of one setting.

    Raises:
        TypeError: a field type this module has no rule for (add one above; the CLI test catches it).
    """
    dotted = ".".join(path)
    names = [flag_of(path)] + ([SHORT_FLAGS[dotted]] if dotted in SHORT_FLAGS else [])
    ann = field.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = inner[0] if len(inner) == 1 else ann
    kw: dict[str, Any] = {"dest": dest_of(path), "default": None}
    text = field.description or ""
    origin = typing.get_origin(ann)
    if ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kw["choices"] = list(typing.get_args(ann))
    elif ann is str and any(isinstance(m, Choices) for m in field.metadata):
        kw["choices"] = list(next(m for m in field.metadata if isinstance(m, Choices)).known())
    elif origin is list and typing.get_args(ann) in ((str,), (int,), (float,)):
        kw.update(action="append", type=typing.get_args(ann)[0], metavar="ITEM")
        text += " Repeat the flag for each item."
    elif origin is dict and typing.get_args(ann) == (str, str):
        kw.update(action="append", type=key_value, metavar="KEY=VALUE")
        text += " Repeat the flag for each KEY=VALUE."
    elif ann in (int, float, str):
        kw.update(type=ann, metavar={int: "INT", float: "FLOAT", str: path[-1].upper()}[ann])
    else:
        raise TypeError(f"setting {dotted}: no command-line rule for type {field.annotation!r}")
    # argparse %-formats help: a literal % must be doubled
    kw["help"] = f"{text} (default: {shown_default(_default(field))})".replace("%", "%%")
    return names, kw


def key_value(text: str) -> tuple[str, str]:
    """``"prompt=question"`` → ``("prompt", "question")`` (an ``argparse`` type)."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. prompt=question; got {text!r}")
    return key.strip(), value.strip()


def add_setting_flag(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
    """Add the flag of one leaf setting (``("data", "fields")``) to ``parser``."""
    field = Settings.model_fields[path[0]]
    for p, leaf in setting_fields(field.annotation, (path[0],)):
        if p == path:
            flags, kw = _argument(p, leaf)
            parser.add_argument(*flags, **kw)
            return
    raise KeyError(path)


def add_setting_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add the flags of the settings ``names`` to ``parser``: a root setting (``workspace``) as one flag,
    a section (``extract``) as a group holding one flag per key, titled with the section's docstring."""
    for name in names:
        field = Settings.model_fields[name]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            doc = " ".join((ann.__doc__ or "").split())
            group = parser.add_argument_group(
                f"[{name}] settings", f"{doc} Also in the config's [{name}] table, or as environment variables "
                f"{ENV_PREFIX}{name.upper()}__<KEY>.".replace("%", "%%"))
            for path, leaf in setting_fields(ann, (name,)):
                flags, kw = _argument(path, leaf)
                group.add_argument(*flags, **kw)
        else:
            flags, kw = _argument((name,), field)
            parser.add_argument(*flags, **kw)


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the parsed flags set, as a nested dict for :func:`~valuegate.settings.load_settings`
    (``{"extract": {"batch_size": 8}, "workspace": "ws"}``); flags left unset are absent."""
    given = vars(args)
    out: dict[str, Any] = {}
    for path, _ in setting_fields():
        value = given.get(dest_of(path))
        if value is None:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = dict(value) if isinstance(value, list) and value and isinstance(value[0], tuple) else value
    return out
