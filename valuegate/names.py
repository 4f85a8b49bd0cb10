"""The one rule for the names a user gives things: datasets, validation sets and releases.

A name becomes part of a table name (``valset__<name>``), a folder (``releases/<name>/``) or a SQL
literal, so it is restricted to a portable alphabet: letters, digits, ``.``, ``_`` and ``-``, starting
with a letter or a digit (so never ``.``, ``..`` or a hidden file), at most :data:`MAX_NAME_LENGTH`
characters. The whole string must match (a trailing newline is not a name).
"""

from __future__ import annotations

import re

from valuegate.errors import ValuegateError

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RULE = (f"use 1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit")


def is_valid_name(name: object) -> bool:
    """Whether ``name`` (any object) is a valid dataset, validation-set or release name."""
    return isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


def _shown(name: object) -> str:
    """``repr`` of a name, shortened past 40 characters (the message stays one readable line)."""
    if isinstance(name, str) and len(name) > 40:
        return f"{name[:40]!r}… ({len(name)} characters)"
    return repr(name)


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid name (one line, without the kind of name), or None when it is."""
    if is_valid_name(name):
        return None
    return f"{_shown(name)}: {RULE}"


def check_name(name: object, kind: str) -> str:
    """Return ``name`` when valid.

    Args:
        name: the name to check.
        kind: what it names, for the message: ``"dataset"``, ``"validation set"`` or ``"release"``.

    Raises:
        ValuegateError: one line, e.g. ``dataset name '../evil': use 1 to 128 letters, ...``.
    """
    problem = name_problem(name)
    if problem is not None:
        raise ValuegateError(f"{kind} name {problem}")
    return name  # type: ignore[return-value]
