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

import hashlib
import json
import unicodedata
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


def read_jsonl_lines(p: Path) -> tuple[list[dict[str, Any] | None], list[tuple[int, str, str]]]:
    """Parse JSON lines, keeping bad lines aside instead of failing.

    Rows are numbered over the non-empty lines, from 0.

    Returns:
        one entry per row (None where the line was refused), and ``(row, raw, reason)`` of each refused
        line (raw decoded with replacement characters where it was not UTF-8).
    """
    rows: list[dict[str, Any] | None] = []
    bad: list[tuple[int, str, str]] = []
    with p.open("rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            row, why = len(rows), ""
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    why = f"line {i + 1}: expected a JSON object, got {type(obj).__name__}"
            except UnicodeDecodeError as exc:
                why = f"line {i + 1}: invalid UTF-8 ({exc.reason})"
            except json.JSONDecodeError as exc:
                why = f"line {i + 1}: malformed JSON: {exc.msg}"
            if why:
                rows.append(None)
                bad.append((row, raw.decode("utf-8", errors="replace").rstrip("\n"), why))
            else:
                rows.append(obj)
    return rows, bad


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    """JSON lines, one object per non-empty line; a bad line is an error naming its row."""
    rows, bad = read_jsonl_lines(p)
    if bad:
        row, _, why = bad[0]
        raise ValuegateError(f"{p}: row {row} ({why.replace(': ', '): ', 1)}")
    return rows  # type: ignore[return-value]


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


# --------------------------------------------------------------------------------------------------
# Ingestion into a workspace: normalisation, content ids, verdicts, quarantine.
# --------------------------------------------------------------------------------------------------

CONTENT_FIELDS = ("kind", "prompt", "response", "messages", "text", "images")


def _norm_text(s: str | None) -> str | None:
    """Unicode NFC and ``\\r\\n`` → ``\\n``: representation only, never the words or spacing."""
    if s is None:
        return None
    return unicodedata.normalize("NFC", s.replace("\r\n", "\n"))


def sample_record(sample: Sample) -> dict[str, Any]:
    """The normalised content of a sample as stored (``messages`` as canonical JSON)."""
    msgs = None
    if sample.messages is not None:
        msgs = json.dumps([{"role": m["role"], "content": _norm_text(m["content"])} for m in sample.messages],
                          ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return {"kind": sample.kind, "prompt": _norm_text(sample.prompt), "response": _norm_text(sample.response),
            "messages": msgs, "text": _norm_text(sample.text), "images": []}


def sample_id(record: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a normalised record's content fields."""
    canon = json.dumps({k: record.get(k) for k in CONTENT_FIELDS}, ensure_ascii=False, sort_keys=True,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def sample_from_record(record: dict[str, Any], row: int = 0, source: str = "store") -> Sample:
    """Rebuild a :class:`Sample` from a stored record (inverse of :func:`sample_record`)."""
    msgs = tuple(json.loads(record["messages"])) if record.get("messages") else None
    return Sample(record["kind"], row, source, prompt=record.get("prompt"), response=record.get("response"),
                  messages=msgs, text=record.get("text"))


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of every file of a folder (sorted by name)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_hf_disk(p: Path) -> pl.DataFrame:
    """A Hugging Face dataset saved with ``save_to_disk`` (folder) or one of its ``.arrow`` files."""
    import pyarrow as pa

    if p.is_dir():
        if (p / "dataset_dict.json").exists():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            raise ValuegateError(f"{p}: a DatasetDict folder; give one split folder, e.g. {p / (splits or ['train'])[0]}")
        state = p / "state.json"
        if not state.exists():
            raise ValuegateError(f"{p}: a folder that is not a Hugging Face save_to_disk dataset (no state.json)")
        files = [p / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    else:
        files = [p]
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
        except pa.ArrowInvalid:
            with pa.memory_map(str(f)) as src:
                tables.append(pa.ipc.open_file(src).read_all())
    return pl.from_arrow(pa.concat_tables(tables)) if tables else pl.DataFrame()


@dataclass
class RowVerdict:
    """One source row: the sample kept (with its record and metadata), or the reason it was refused."""

    row: int
    sample: Sample | None
    raw: str
    reason: str
    metadata: dict[str, Any] | None = None


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)


def read_source_rows(path: str | Path, max_chars: int) -> list[RowVerdict]:
    """Every row of a source with its verdict: every format, bad lines included, nothing dropped.

    Args:
        path: JSONL / Parquet / CSV file, a ``save_to_disk`` folder, or an ``.arrow`` file.
        max_chars: rows whose content is longer are refused as oversized.
    """
    p = Path(path)
    source = str(path)
    if not p.exists():
        raise ValuegateError(f"{p}: no such file or folder")
    bad: list[tuple[int, str, str]] = []
    if p.is_dir() or p.suffix.lower() == ".arrow":
        df, records = _read_hf_disk(p), None
    elif p.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        lines, bad = read_jsonl_lines(p)
        good = [r for r in lines if r is not None]
        df = pl.DataFrame(good, infer_schema_length=None, strict=False) if good else pl.DataFrame()
        records = lines
    else:
        df, records = read_table(p)
    if records is None:
        records = list(df.iter_rows(named=True))
    verdicts = [RowVerdict(row, None, raw, reason) for row, raw, reason in bad]
    good_records = [(i, r) for i, r in enumerate(records) if r is not None]
    if not good_records:
        return sorted(verdicts, key=lambda v: v.row)
    cols = sorted({k for _, r in good_records for k in r})
    kind = sample_kind(cols, source)
    sample_cols = {"prompt_response": {"prompt", "response"}, "messages": {"messages"}, "text": {"text"}}[kind]
    for i, rec in good_records:
        raw = json.dumps({k: _jsonable(v) for k, v in rec.items()}, ensure_ascii=False)
        sample, why = check_row(rec, kind, i, source)
        if sample is not None:
            size = sum(len(x) for x in (sample.prompt, sample.response, sample.text) if x) + sum(
                len(m["content"]) for m in (sample.messages or ()))
            if size > max_chars:
                sample, why = None, f"{sample.counted_field}: oversized ({size} characters > {max_chars})"
        meta = {k: _jsonable(v) for k, v in rec.items() if k not in sample_cols} if sample else None
        verdicts.append(RowVerdict(i, sample, raw, why, meta))
    return sorted(verdicts, key=lambda v: v.row)


@dataclass
class FileReport:
    """What ingesting one source did."""

    source: str
    rows: int = 0
    kept: int = 0
    new_samples: int = 0
    duplicates: int = 0
    quarantined: int = 0
    left: int = 0
    unchanged: bool = False
    reasons: dict[str, int] | None = None

    def line(self) -> str:
        """One human line."""
        if self.unchanged:
            return f"{self.source}: unchanged since its last ingest (no-op)"
        why = "; ".join(f"{k}: {v}" for k, v in sorted((self.reasons or {}).items()))
        return (f"{self.source}: {self.rows} rows, {self.kept} kept ({self.new_samples} new samples, "
                f"{self.duplicates} duplicates), {self.quarantined} quarantined"
                + (f" [{why}]" if why else "") + (f", {self.left} ids left" if self.left else ""))


def _reason_key(reason: str) -> str:
    """Group reasons for counting: the field and the kind of problem, without row-specific detail."""
    head = reason.split(" (", 1)[0]
    return head.split(": ", 1)[-1] if head.startswith("line ") else head


def ingest_file(ws: Any, dataset: str, path: str | Path, max_chars: int) -> FileReport:
    """Ingest one source into ``dataset`` of workspace ``ws`` (see ``storage/samples.py`` for the write order).

    Re-ingesting an unchanged file is a no-op; a changed file replaces its rows: new contents are added,
    and ids that only the old version held are recorded as left.
    """
    import datetime as dt
    from collections import Counter

    import pyarrow as pa

    from valuegate.storage import samples as store
    from valuegate.storage import schemas

    source = str(Path(path).resolve())
    digest = file_hash(path)
    last = store.read_last_ingest(ws, dataset, source)
    if last is not None and last["source_hash"] == digest:
        return FileReport(source, unchanged=True)
    verdicts = read_source_rows(path, max_chars)
    now = dt.datetime.now(dt.timezone.utc)
    kept = [v for v in verdicts if v.sample is not None]
    refused = [v for v in verdicts if v.sample is None]
    records = [sample_record(v.sample) for v in kept]
    ids = [sample_id(r) for r in records]
    # samples: only contents the workspace has not seen
    known = store.known_sample_ids(ws, sorted(set(ids)))
    fresh: dict[str, dict[str, Any]] = {}
    for sid, rec in zip(ids, records, strict=True):
        if sid not in known and sid not in fresh:
            fresh[sid] = {"id": sid, **rec, "first_seen": now}
    store.write_samples(ws, pa.Table.from_pylist(list(fresh.values()), schema=schemas.samples_schema))
    # quarantine and members of this source, replaced as a whole
    store.replace_source_rows(ws, schemas.QUARANTINE, dataset, source, pa.Table.from_pylist(
        [{"dataset": dataset, "source": source, "row": v.row, "source_hash": digest, "raw": v.raw,
          "reason": v.reason, "at": now} for v in refused], schema=schemas.quarantine_schema),
        schemas.quarantine_schema)
    old_members = store.read_members(ws, dataset, columns=["id", "source"]).to_pylist()
    other_ids = {m["id"] for m in old_members if m["source"] != source}
    old_ids = {m["id"] for m in old_members if m["source"] == source}
    store.replace_source_rows(ws, schemas.MEMBERS, dataset, source, pa.Table.from_pylist(
        [{"dataset": dataset, "source": source, "row": v.row, "id": sid,
          "metadata": json.dumps(v.metadata, ensure_ascii=False, sort_keys=True), "source_hash": digest}
         for v, sid in zip(kept, ids, strict=True)], schema=schemas.members_schema), schemas.members_schema)
    seen: set[str] = set()
    dups = 0
    for sid in ids:
        dups += sid in seen or sid in other_ids
        seen.add(sid)
    left = sorted(old_ids - seen - other_ids)
    reasons = Counter(_reason_key(v.reason) for v in refused)
    store.write_ingest_record(ws, {
        "dataset": dataset, "source": source, "source_hash": digest, "at": now, "rows": len(verdicts),
        "kept": len(kept), "new_samples": len(fresh), "duplicates": dups, "quarantined": len(refused),
        "left_ids": left})
    return FileReport(source, len(verdicts), len(kept), len(fresh), dups, len(refused), len(left),
                      reasons=dict(reasons))
