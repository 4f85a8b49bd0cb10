"""Read training and validation files with polars and turn rows into samples.

A sample is one of three shapes (the first that a file's columns allow):

- ``prompt`` + ``response``: the text is ``prompt + response`` (no separator is added);
- ``messages``: a chat list of ``{role, content}``, rendered with the tokenizer's chat template;
- ``text``: plain text.

Every other column is carried through untouched. Row checks return ``(keep, reason)`` verdicts
(:func:`check_row`); :func:`read_samples` turns the first refusal into a :class:`ValuegateError` that
names the file, the 0-based row and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from valuegate.errors import ValuegateError

SampleKind = Literal["prompt_response", "messages", "text"]
READABLE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Sample:
    """One normalised sample.

    Attributes:
        kind: which of the three shapes it has.
        row: 0-based row in its source file.
        source: the file it came from.
        prompt: prompt text (``prompt_response``), else None.
        response: response text (``prompt_response``), else None.
        messages: chat turns ``({"role", "content"}, ...)`` (``messages``), else None.
        text: plain text (``text``), else None.
    """

    kind: SampleKind
    row: int
    source: str
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None

    @property
    def counted_field(self) -> str:
        """The field whose tokens the response-only loss counts (used in error messages)."""
        return {"prompt_response": "response", "messages": "messages", "text": "text"}[self.kind]


def read_table(path: str | Path) -> tuple[pl.DataFrame, list[dict[str, Any]] | None]:
    """Read a JSONL, Parquet or CSV file into a data frame.

    Returns:
        the frame, and for JSON lines the parsed records as they came (the frame may have unified the
        types of a column across rows; row checks must see the raw values), else None.

    Raises:
        ValuegateError: the file is missing, has an unknown suffix, or does not parse (the message says
            which line when polars can tell).
    """
    p = Path(path)
    if not p.exists():
        raise ValuegateError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            records = _read_jsonl(p)
            return (pl.DataFrame(records, infer_schema_length=None, strict=False) if records
                    else pl.DataFrame()), records
        if suffix == ".parquet":
            return pl.read_parquet(p), None
        if suffix == ".csv":
            return pl.read_csv(p, infer_schema_length=0), None  # every column as text: no silent casts
    except ValuegateError:
        raise
    except Exception as exc:  # polars raises many types; the user needs the file and the cause
        raise ValuegateError(f"{p}: cannot be read as {suffix[1:]}: {exc}") from exc
    raise ValuegateError(f"{p}: unsupported file type {suffix or '(none)'}; use one of "
                         + ", ".join(READABLE_SUFFIXES))


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    """JSON lines, one object per non-empty line; a bad line is an error naming its row."""
    rows: list[dict[str, Any]] = []
    with p.open("rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise ValuegateError(f"{p}: row {len(rows)} (line {i + 1}): invalid UTF-8 ({exc.reason})") from exc
            except json.JSONDecodeError as exc:
                raise ValuegateError(f"{p}: row {len(rows)} (line {i + 1}): malformed JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise ValuegateError(f"{p}: row {len(rows)} (line {i + 1}): expected a JSON object, "
                                     f"got {type(obj).__name__}")
            rows.append(obj)
    return rows


def sample_kind(columns: list[str], source: str) -> SampleKind:
    """The sample shape a file's columns allow, or an error saying which columns are expected."""
    cols = set(columns)
    if {"prompt", "response"} <= cols:
        return "prompt_response"
    if "messages" in cols:
        return "messages"
    if "text" in cols:
        return "text"
    raise ValuegateError(
        f"{source}: no sample fields: expected columns 'prompt' and 'response', or 'messages', or 'text'; "
        f"found {sorted(cols) or 'no columns'}")


def _parse_messages(value: Any) -> tuple[tuple[dict[str, str], ...] | None, str]:
    if isinstance(value, str):  # CSV or a JSON-encoded column
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, "messages is a string that is not a JSON list of turns"
    if not isinstance(value, (list, tuple)) or not value:
        return None, "messages must be a non-empty list of {role, content} turns"
    turns = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict):
            return None, f"messages[{j}] is not an object with role and content"
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            return None, f"messages[{j}].role must be one of {', '.join(CHAT_ROLES)} (got {role!r})"
        if not isinstance(content, str) or not content.strip():
            return None, f"messages[{j}].content must be a non-empty string"
        turns.append({"role": role, "content": content})
    return tuple(turns), ""


def check_row(record: dict[str, Any], kind: SampleKind, row: int, source: str) -> tuple[Sample | None, str]:
    """Validate one row. Returns ``(sample, "")`` when kept, ``(None, "field: reason")`` when refused."""
    if kind == "prompt_response":
        for name in ("prompt", "response"):
            v = record.get(name)
            if not isinstance(v, str):
                return None, f"{name}: expected a string, got {type(v).__name__ if v is not None else 'null'}"
        if not record["response"].strip():
            return None, "response: empty"
        # an empty prompt is allowed (continuation data); the response alone counts
        return Sample(kind, row, source, prompt=record["prompt"], response=record["response"]), ""
    if kind == "messages":
        turns, why = _parse_messages(record.get("messages"))
        if turns is None:
            return None, f"messages: {why}"
        return Sample(kind, row, source, messages=turns), ""
    v = record.get("text")
    if not isinstance(v, str):
        return None, f"text: expected a string, got {type(v).__name__ if v is not None else 'null'}"
    if not v.strip():
        return None, "text: empty"
    return Sample(kind, row, source, text=v), ""


def samples_from_frame(df: pl.DataFrame, source: str,
                       records: list[dict[str, Any]] | None = None) -> list[Sample]:
    """All rows of a frame as samples; the first refused row raises an error naming file, row and field.

    Args:
        df: the rows. source: file name for messages. records: the raw rows when the frame may have
            coerced them (JSON lines); checked instead of the frame.
    """
    if df.height == 0:
        raise ValuegateError(f"{source}: the file has no rows")
    kind = sample_kind(df.columns, source)
    wanted = {"prompt_response": ["prompt", "response"], "messages": ["messages"], "text": ["text"]}[kind]
    rows = records if records is not None else df.select(wanted).iter_rows(named=True)
    out = []
    for i, record in enumerate(rows):
        sample, why = check_row(record, kind, i, source)
        if sample is None:
            raise ValuegateError(f"{source}: row {i}: {why}")
        out.append(sample)
    return out


def read_samples(path: str | Path) -> tuple[pl.DataFrame, list[Sample]]:
    """Read a file and validate every row.

    Returns:
        the frame as read (every input column, in order) and one sample per row.
    """
    df, records = read_table(path)
    return df, samples_from_frame(df, str(path), records)
