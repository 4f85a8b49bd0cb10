"""The extra columns of a source row (its metadata) as stored: JSON, typed where JSON has no type.

``members.metadata`` (and a validation set's ``metadata``) is one JSON object per row. Plain JSON values
(strings, numbers, booleans, null, lists, objects) are stored as they are, as they always were. A value of
a column whose Arrow type JSON cannot carry is stored as a tagged object that names the type, so that the
frame a release is cut from gets the column back with its type:

=============  =====================================================================================
Arrow type     stored as
=============  =====================================================================================
binary         ``{"__valuegate__": "binary", "base64": "..."}`` (also large and fixed-size binary)
timestamp      ``{"__valuegate__": "timestamp", "unit": "us", "tz": "UTC", "value": <int since epoch>}``
date32/64      ``{"__valuegate__": "date32", "value": <days>}`` (``date64``: milliseconds)
time32/64      ``{"__valuegate__": "time64", "unit": "us", "value": <int since midnight>}``
duration       ``{"__valuegate__": "duration", "unit": "ms", "value": <int>}``
decimal        ``{"__valuegate__": "decimal128", "precision": 10, "scale": 2, "value": "12.50"}``
=============  =====================================================================================

A JSON object of the source that has a ``__valuegate__`` key itself is wrapped as
``{"__valuegate__": "json", "value": {...}}``, so it reads back as it came. Such types nested inside a list
or struct column are not carried (they are stored by :func:`describe`: bytes by length and sha256, any
other value by ``str``). Metadata never enters a sample's id (ids hash the sample's content only).
"""

from __future__ import annotations

import base64
import decimal
import json
from typing import Any

import polars as pl
import pyarrow as pa

from valuegate.inputs.values import describe

TAG = "__valuegate__"
_INTS = {"timestamp": pa.int64(), "date32": pa.int32(), "date64": pa.int64(), "time32": pa.int32(),
         "time64": pa.int64(), "duration": pa.int64()}


def _type_tag(t: pa.DataType) -> dict[str, Any] | None:
    """The tag (without the value) of a top-level column type JSON cannot carry, else None."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return {TAG: "binary"}
    if pa.types.is_timestamp(t):
        return {TAG: "timestamp", "unit": t.unit, "tz": t.tz}
    if pa.types.is_date32(t) or pa.types.is_date64(t):
        return {TAG: "date32" if pa.types.is_date32(t) else "date64"}
    if pa.types.is_time32(t) or pa.types.is_time64(t):
        return {TAG: "time32" if pa.types.is_time32(t) else "time64", "unit": t.unit}
    if pa.types.is_duration(t):
        return {TAG: "duration", "unit": t.unit}
    if pa.types.is_decimal(t):
        return {TAG: "decimal256" if pa.types.is_decimal256(t) else "decimal128", "precision": t.precision,
                "scale": t.scale}
    return None


def _arrow_type(tag: dict[str, Any]) -> pa.DataType:
    kind = tag[TAG]
    if kind == "binary":
        return pa.binary()
    if kind == "timestamp":
        return pa.timestamp(tag["unit"], tz=tag.get("tz"))
    if kind in ("date32", "date64"):
        return pa.date32() if kind == "date32" else pa.date64()
    if kind in ("time32", "time64"):
        return (pa.time32 if kind == "time32" else pa.time64)(tag["unit"])
    if kind == "duration":
        return pa.duration(tag["unit"])
    if kind in ("decimal128", "decimal256"):
        return (pa.decimal128 if kind == "decimal128" else pa.decimal256)(tag["precision"], tag["scale"])
    raise ValueError(f"unknown metadata type tag {kind!r}")


def encode_value(v: Any, t: pa.DataType | None = None) -> Any:
    """One metadata value as stored (see the module docstring); ``t``: its column's Arrow type, if known."""
    if v is None:
        return None
    tag = _type_tag(t) if t is not None else None
    if tag is not None:
        if tag[TAG] == "binary":
            return {**tag, "base64": base64.b64encode(bytes(v)).decode("ascii")}
        if tag[TAG] in _INTS:
            return {**tag, "value": pa.array([v], type=t).cast(_INTS[tag[TAG]])[0].as_py()}
        return {**tag, "value": str(v)}  # a decimal, exactly as written (its scale is the type's)
    if isinstance(v, dict):
        plain = describe(v)
        return {TAG: "json", "value": plain} if TAG in plain else plain
    return describe(v)


def encode_metadata(record: dict[str, Any], types: dict[str, pa.DataType] | None = None) -> dict[str, Any]:
    """A row's extra columns as stored: ``{column: encode_value(value, its type)}``."""
    types = types or {}
    return {k: encode_value(v, types.get(k)) for k, v in record.items()}


def _tag_of(v: Any) -> str | None:
    return v.get(TAG) if isinstance(v, dict) and isinstance(v.get(TAG), str) else None


def _decoded(v: dict[str, Any]) -> Any:
    kind = v[TAG]
    if kind == "binary":
        return base64.b64decode(v["base64"])
    if kind.startswith("decimal"):
        return decimal.Decimal(v["value"])
    return v["value"]


def _typed_column(name: str, values: list[Any]) -> pl.Series | None:
    """A column whose non-null values all carry the same type tag, with that type; None if they do not."""
    tags = {json.dumps({k: x for k, x in v.items() if k not in ("value", "base64")}, sort_keys=True)
            if _tag_of(v) not in (None, "json") else None for v in values if v is not None}
    if len(tags) != 1 or None in tags:
        return None
    tag = json.loads(tags.pop())
    t = _arrow_type(tag)
    raw = [None if v is None else _decoded(v) for v in values]
    try:
        ints = _INTS.get(tag[TAG])  # temporal types travel as their integer since the epoch (or midnight)
        arr = pa.array(raw, type=ints).cast(t) if ints is not None else pa.array(raw, type=t)
        return pl.Series(name, pl.from_arrow(arr))
    except (pa.ArrowException, TypeError, ValueError, pl.exceptions.PolarsError):
        return None  # a type polars does not hold (e.g. a too wide decimal): read back as text below


def _plain(v: Any) -> Any:
    """A stored value without type tags: a wrapped JSON object unwrapped, a typed value as text."""
    kind = _tag_of(v)
    if kind is None:
        return v
    if kind == "json":
        return v.get("value")
    return str(_decoded(v)) if kind != "binary" else v["base64"]


def metadata_frame(stored: list[str | None]) -> pl.DataFrame | None:
    """The rows' extra columns as a frame, one row per stored JSON (None: no extra column at all).

    Columns come in the order they first appear. A column whose values all carry one type tag gets that
    Arrow type; plain JSON columns are read as before (polars infers one type per column, ``strict=False``);
    a column mixing types reads as text.
    """
    rows = [json.loads(s) if s else {} for s in stored]
    if not any(rows):
        return None
    names = list(dict.fromkeys(k for r in rows for k in r))
    typed: dict[str, pl.Series] = {}
    for name in names:
        values = [r.get(name) for r in rows]
        if any(_tag_of(v) not in (None, "json") for v in values):
            series = _typed_column(name, values)
            typed[name] = series if series is not None else pl.Series(
                name, [None if v is None else str(_plain(v)) for v in values], dtype=pl.String)
    plain_names = [n for n in names if n not in typed]
    if not plain_names:
        return pl.DataFrame(list(typed.values())).select(names)
    frame = pl.DataFrame([{n: _plain(r.get(n)) for n in plain_names} for r in rows],
                         infer_schema_length=None, strict=False)
    return frame.with_columns(*typed.values()).select(names)
