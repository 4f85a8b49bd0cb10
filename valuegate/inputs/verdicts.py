"""Every row of a source with its verdict: the sample it forms, or the one-line reason it is refused.

The readers (:mod:`valuegate.inputs.readers`) give raw rows, the format (:mod:`valuegate.inputs.formats`) names
the canonical fields, the row checks (:func:`valuegate.inputs.rows.row_sample`) build the sample; this module
adds the checks that need the whole row (an assistant turn to value, the size limit) and keeps every other
column as the row's ``extra``. Nothing is dropped: a refused row keeps its raw form and reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valuegate.engine.sample import Problem, Sample
from valuegate.inputs.formats import Format, recognise, source_names
from valuegate.inputs.readers import RawRow, iter_source_records
from valuegate.inputs.rows import row_sample
from valuegate.inputs.values import describe


@dataclass
class RowVerdict:
    """One source row: the sample kept, or the reason it was refused.

    Attributes:
        row (int): the row's number in its source (from 0).
        sample (Sample | None): the sample, or None when refused.
        raw (str): the row as JSON (bytes described, never inlined; what quarantine keeps).
        problem (Problem | None): why it was refused (None when kept); its words are :attr:`reason`.
        extra (dict | None): a kept row's other columns, its metadata before encoding (an images column
            replaced by the images' content hashes); None when refused.
        types (dict | None): the Arrow type of each column, when the source has them (for encoding ``extra``:
            :func:`valuegate.storage.metadata.encode_metadata`).
    """

    row: int
    sample: Sample | None
    raw: str
    problem: Problem | None
    extra: dict[str, Any] | None = None
    types: dict[str, Any] | None = None

    @property
    def reason(self) -> str:
        """Why the row was refused, in words ("" when kept): what quarantine keeps."""
        return "" if self.problem is None else str(self.problem)


def verdicts_for(chunk: list[RawRow], fmt: Format, source: str, max_chars: int,
                 types: dict[str, Any] | None = None) -> list[RowVerdict]:
    """Check every row of a chunk of a file of format ``fmt`` (see :func:`valuegate.inputs.rows.row_sample`),
    adding the oversize and the assistant-turn checks. A kept row's other columns are its ``extra``
    (``types``: the Arrow type of each column, when the source has them)."""

    sample_cols = fmt.columns
    out = []
    for i, rec, raw, why in chunk:
        if rec is None:
            out.append(RowVerdict(i, None, raw, why))
            continue
        raw = json.dumps({k: describe(v) for k, v in rec.items()}, ensure_ascii=False)
        sample, why = row_sample(rec, fmt, i, source)
        if sample is not None and sample.kind == "messages" and not any(
                m["role"] == "assistant" for m in sample.messages or ()):
            # the response loss (chat's default) counts assistant turns only: such a row can never be valued
            sample, why = None, Problem("conversations" if fmt.name == "sharegpt" else "messages", "no assistant turn")
        if sample is not None:
            size = sum(len(x) for x in (sample.prompt, sample.response, sample.text) if x) + sum(
                len(m["content"]) if isinstance(m["content"], str)
                else sum(len(p.get("text", "")) for p in m["content"]) for m in (sample.messages or ()))
            if size > max_chars:
                field, at = sample.longest_field
                sample, why = None, Problem(source_names(fmt).get(field, field), "oversized", at,
                                            f"{size} characters > {max_chars}")
        extra = {k: v for k, v in rec.items() if k not in sample_cols} if sample else None
        images_col = fmt.source_name("images")
        row_types = types
        if extra is not None and images_col in rec:
            # ``images`` now holds content hashes (strings), whatever the source column's type was
            row_types = {k: t for k, t in (types or {}).items() if k not in (images_col, "images")}
            # the release carries the images by content hash (resolved in the workspace's image table)
            extra.pop(images_col, None)
            extra["images"] = list(sample.images or ())
        out.append(RowVerdict(i, sample, raw, why, extra, row_types if extra is not None else None))
    return out


def iter_source_verdicts(path: str | Path, max_chars: int, chunk_rows: int = 50_000,
                         fields: dict[str, str] | None = None) -> Iterator[list[RowVerdict]]:
    """Every row of a source file with its verdict, chunk by chunk; nothing dropped.

    The format is recognised from the columns of the first chunk that has a parsed row
    (:func:`valuegate.inputs.formats.recognise`, with the column mapping ``fields``); later rows lacking
    those columns are refused with the field named.
    """
    fmt: Format | None = None
    pending: list[list[RawRow]] = []
    types: dict[str, Any] = {}
    for chunk in iter_source_records(path, chunk_rows, types):
        if fmt is None:
            cols = sorted({k for _, r, _, _ in chunk if r is not None for k in r})
            if not cols:
                pending.append(chunk)
                continue
            fmt = recognise(cols, str(path), fields)
        for c in [*pending, chunk]:
            yield verdicts_for(c, fmt, str(path), max_chars, types)
        pending = []
    for c in pending:  # a file of nothing but unparseable lines and empty objects
        yield [RowVerdict(i, None, raw if rec is None else "{}", why or Problem("no sample fields", "an empty object"))
               for i, rec, raw, why in c]


def read_source_rows(path: str | Path, max_chars: int, fields: dict[str, str] | None = None) -> list[RowVerdict]:
    """All rows of a source with their verdicts (see :func:`iter_source_verdicts`), in one list."""
    return [v for chunk in iter_source_verdicts(path, max_chars, fields=fields) for v in chunk]
