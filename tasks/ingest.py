"""Read training and validation files with polars and turn rows into samples.

A sample is one of three shapes (the first that a file's columns allow):

- ``prompt`` + ``response``: the text is ``prompt + response`` (no separator is added);
- ``messages``: a chat list of ``{role, content}``, rendered with the tokenizer's chat template;
- ``text``: plain text.

Prompt/response and chat samples may carry images (an ``images`` column; see ``valuegate/engine/images.py``): a
prompt marks where each image goes with ``<image>`` (none: the images go before the prompt), a chat puts
them in its user/system turns, as ``{"type": "image"}`` parts of a list content (the processors' chat
convention) or as ``<image>`` markers in a string content. Every image is opened and checked with Pillow;
a bad image refuses its row with the reason.

Every other column is carried through untouched. Row checks return ``(keep, reason)`` verdicts
(:func:`check_row`); :func:`read_samples` turns the first refusal into a :class:`ValuegateError` that
names the file, the 0-based row and the field.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from valuegate.digests import sha256_path
from valuegate.engine.sample import Sample, SampleKind
from valuegate.errors import ValuegateError
from valuegate.names import check_name
from valuegate.settings import Settings

READABLE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv")
CHAT_ROLES = ("system", "user", "assistant", "tool")
IMAGE_MARKER = "<image>"  # where an image goes in a prompt or a string chat turn


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
            raw = raw.removeprefix(codecs.BOM_UTF8) if i == 0 else raw  # a BOM, as the CSV reader takes it
            if not raw.strip():
                continue
            obj, why = _parse_json_line(raw, i)
            if obj is None:
                bad.append((len(rows), raw.decode("utf-8", errors="replace").rstrip("\n"), why))
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


def _image_parts(content: Any, j: int, role: str) -> tuple[list[dict[str, str]] | None, str]:
    """A turn's content as ``{"type": "text"|"image"}`` parts (``<image>`` markers of a string split out)."""
    if isinstance(content, str):
        pieces = content.split(IMAGE_MARKER)
        parts: list[dict[str, str]] = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts, ""
    if not isinstance(content, (list, tuple)):
        return None, f"messages[{j}].content must be a string or a list of parts"
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            parts.append({"type": "image"})  # the image itself comes from the row's images, in order
        else:
            return None, f"messages[{j}].content[{k}] must be {{type: text, text}} or {{type: image}}"
    return parts, ""


def _parse_messages(value: Any, with_images: bool = False) -> tuple[tuple[dict[str, Any], ...] | None, str]:
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
        if with_images:
            parts, why = _image_parts(content, j, role)
            if parts is None:
                return None, why
            if role in ("assistant", "tool") and any(p["type"] == "image" for p in parts):
                return None, f"messages[{j}]: an image in a {role} turn (images go in user or system turns)"
            if not any(p["type"] == "image" or p["text"].strip() for p in parts):
                return None, f"messages[{j}].content must not be empty"
            has_image = any(p["type"] == "image" for p in parts)
            turns.append({"role": role, "content": parts if has_image else "".join(p["text"] for p in parts)})
            continue
        if not isinstance(content, str) or not content.strip():
            return None, f"messages[{j}].content must be a non-empty string"
        turns.append({"role": role, "content": content})
    return tuple(turns), ""


def _count_image_slots(sample_kind_: SampleKind, prompt: str | None, turns: tuple[dict[str, Any], ...] | None) -> int:
    if sample_kind_ == "prompt_response":
        return (prompt or "").count(IMAGE_MARKER)
    return sum(1 for t in turns or () if not isinstance(t["content"], str)
               for p in t["content"] if p["type"] == "image")


def _with_images(record: dict[str, Any], sample: Sample, source: str) -> tuple[Sample | None, str]:
    """Open and check the row's images and attach them (hashes and bytes) to its sample."""
    from valuegate.engine.images import images_from_field

    base = Path(source).parent if source and Path(source).suffix else None
    imgs, why = images_from_field(record.get("images"), base)
    if imgs is None:
        return None, why
    if not imgs:
        return sample, ""
    if sample.kind == "text":
        return None, "images: text samples cannot carry images (give prompt/response or messages)"
    slots = _count_image_slots(sample.kind, sample.prompt, sample.messages)
    if sample.kind == "messages" and slots != len(imgs):
        return None, (f"images: {len(imgs)} images but {slots} image placeholders in the user turns "
                      f"({{type: image}} parts or {IMAGE_MARKER} markers)")
    if sample.kind == "prompt_response" and slots not in (0, len(imgs)):
        return None, f"images: {len(imgs)} images but {slots} {IMAGE_MARKER} markers in the prompt (give one each, or none)"
    if sample.kind == "prompt_response" and IMAGE_MARKER in sample.response:
        return None, f"response: an {IMAGE_MARKER} marker in the response (images go in the prompt)"
    return Sample(sample.kind, sample.row, sample.source, prompt=sample.prompt, response=sample.response,
                  messages=sample.messages, images=tuple(i.sha256 for i in imgs),
                  image_data=tuple(i.data for i in imgs)), ""


def check_row(record: dict[str, Any], kind: SampleKind, row: int, source: str) -> tuple[Sample | None, str]:
    """Validate one row. Returns ``(sample, "")`` when kept, ``(None, "field: reason")`` when refused.

    A row with a non-empty ``images`` field has every image opened and checked (``valuegate/engine/images.py``);
    relative image paths are relative to the folder of ``source``.
    """
    sample, why = _check_fields(record, kind, row, source)
    if sample is None or record.get("images") is None:
        return sample, why
    return _with_images(record, sample, source)


def _check_fields(record: dict[str, Any], kind: SampleKind, row: int, source: str) -> tuple[Sample | None, str]:
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
        turns, why = _parse_messages(record.get("messages"), _has_images(record.get("images")))
        if turns is None:
            return None, f"messages: {why}"
        return Sample(kind, row, source, messages=turns), ""
    v = record.get("text")
    if not isinstance(v, str):
        return None, f"text: expected a string, got {type(v).__name__ if v is not None else 'null'}"
    if not v.strip():
        return None, "text: empty"
    return Sample(kind, row, source, text=v), ""


def _has_images(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip() not in ("", "[]")
    return not isinstance(value, (list, tuple)) or len(value) > 0


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
    wanted += ["images"] if "images" in df.columns else []
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
        msgs = json.dumps([{"role": m["role"], "content": _norm_content(m["content"])} for m in sample.messages],
                          ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return {"kind": sample.kind, "prompt": _norm_text(sample.prompt), "response": _norm_text(sample.response),
            "messages": msgs, "text": _norm_text(sample.text), "images": list(sample.images or ())}


def _norm_content(content: Any) -> Any:
    if isinstance(content, str):
        return _norm_text(content)
    return [{**p, "text": _norm_text(p["text"])} if p.get("type") == "text" else dict(p) for p in content]


def sample_id(record: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a normalised record's content fields (images by the sha256
    of their bytes, never by path: the same picture under two names is one sample)."""
    canon = json.dumps({k: record.get(k) for k in CONTENT_FIELDS}, ensure_ascii=False, sort_keys=True,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def sample_from_record(record: dict[str, Any], row: int = 0, source: str = "store") -> Sample:
    """Rebuild a :class:`Sample` from a stored record (inverse of :func:`sample_record`)."""
    msgs = tuple(json.loads(record["messages"])) if record.get("messages") else None
    return Sample(record["kind"], row, source, prompt=record.get("prompt"), response=record.get("response"),
                  messages=msgs, text=record.get("text"), images=tuple(record.get("images") or ()) or None)


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of every file of a folder (sorted by relative path)."""
    return sha256_path(path)


@dataclass
class RowVerdict:
    """One source row: the sample kept (with its record and metadata), or the reason it was refused."""

    row: int
    sample: Sample | None
    raw: str
    reason: str
    metadata: dict[str, Any] | None = None


RawRow = tuple[int, "dict[str, Any] | None", str, str]  # (row, record or None, raw if refused, reason)


def _hf_files(p: Path) -> list[Path]:
    if not p.is_dir():
        return [p]
    if (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise ValuegateError(f"{p}: a DatasetDict folder; give one split folder, e.g. {p / (splits or ['train'])[0]}")
    state = p / "state.json"
    if not state.exists():
        raise ValuegateError(f"{p}: a folder that is not a Hugging Face save_to_disk dataset (no state.json)")
    return [p / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]


def _arrow_batches(files: list[Path], chunk_rows: int,
                   types: dict[str, Any] | None = None) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa

    for f in files:
        with pa.memory_map(str(f)) as src:
            try:
                reader = pa.ipc.open_stream(src)
                batches = iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(src)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for b in batches:
                _note_types(b.schema, types)
                for lo in range(0, b.num_rows, chunk_rows):
                    yield b.slice(lo, chunk_rows).to_pylist()


def _note_types(schema: Any, types: dict[str, Any] | None) -> None:
    if types is not None:
        types.update((f.name, f.type) for f in schema)


def iter_source_records(path: str | Path, chunk_rows: int = 50_000,
                        types: dict[str, Any] | None = None) -> Iterator[list[RawRow]]:
    """Stream a source in chunks of rows, never holding the whole file: JSONL line by line, Parquet by
    row group batches, CSV through Arrow's streaming reader (every column as text), Arrow IPC by batch.

    ``types``, when given, receives the Arrow type of each column of a Parquet or Arrow source (column →
    ``pa.DataType``), for the metadata of typed columns (:mod:`valuegate.storage.metadata`).

    Yields:
        lists of ``(row, record, raw, reason)``; ``record`` is None for a line that could not be parsed,
        with its raw text and the reason.
    """
    p = Path(path)
    if not p.exists():
        raise ValuegateError(f"{p}: no such file")
    suffix = p.suffix.lower()
    row = 0

    def numbered(records: list[dict[str, Any]]) -> list[RawRow]:
        nonlocal row
        out = [(row + i, r, "", "") for i, r in enumerate(records)]
        row += len(records)
        return out

    try:
        if p.is_dir() or suffix == ".arrow":
            for recs in _arrow_batches(_hf_files(p), chunk_rows, types):
                yield numbered(recs)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            chunk: list[RawRow] = []
            with p.open("rb") as f:
                for i, raw in enumerate(f):
                    raw = raw.removeprefix(codecs.BOM_UTF8) if i == 0 else raw  # a leading UTF-8 BOM
                    if not raw.strip():
                        continue
                    rec, why = _parse_json_line(raw, i)
                    chunk.append((row, rec, "" if rec is not None else raw.decode("utf-8", "replace").rstrip("\n"), why))
                    row += 1
                    if len(chunk) >= chunk_rows:
                        yield chunk
                        chunk = []
            if chunk:
                yield chunk
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for b in pq.ParquetFile(p).iter_batches(batch_size=chunk_rows):
                _note_types(b.schema, types)
                yield numbered(b.to_pylist())
        elif suffix == ".csv":
            import csv

            import pyarrow as pa
            import pyarrow.csv as pacsv

            with p.open(newline="", encoding="utf-8", errors="replace") as fh:
                header = next(csv.reader(fh), [])
            conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in header}, strings_can_be_null=False)
            reader = pacsv.open_csv(p, read_options=pacsv.ReadOptions(block_size=1 << 24), convert_options=conv)
            for b in reader:
                for lo in range(0, b.num_rows, chunk_rows):
                    yield numbered(b.slice(lo, chunk_rows).to_pylist())
        else:
            raise ValuegateError(f"{p}: unsupported file type {suffix or '(none)'}; use one of "
                                 + ", ".join(READABLE_SUFFIXES) + ", a save_to_disk folder or .arrow")
    except ValuegateError:
        raise
    except Exception as exc:  # a reader's own error: name the file and the cause
        raise ValuegateError(f"{p}: cannot be read: {exc}") from exc


def _parse_json_line(raw: bytes, line_index: int) -> tuple[dict[str, Any] | None, str]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"line {line_index + 1}: invalid UTF-8 ({exc.reason})"
    except json.JSONDecodeError as exc:
        return None, f"line {line_index + 1}: malformed JSON: {exc.msg}"
    if not isinstance(obj, dict):
        return None, f"line {line_index + 1}: expected a JSON object, got {type(obj).__name__}"
    if b"\\u" in raw and _has_lone_surrogate(obj):  # "\ud800" parses, but is no character: no text holds it
        return None, f"line {line_index + 1}: invalid Unicode (a lone surrogate escape)"
    return obj, ""


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def verdicts_for(chunk: list[RawRow], kind: SampleKind, source: str, max_chars: int,
                 types: dict[str, Any] | None = None) -> list[RowVerdict]:
    """Check every row of a chunk (see :func:`check_row`), adding the oversize and the assistant-turn
    checks. A kept row's other columns become its metadata (:func:`valuegate.storage.metadata.encode_metadata`;
    ``types``: the Arrow type of each column, when the source has them)."""
    from valuegate.storage.metadata import describe, encode_metadata

    sample_cols = {"prompt_response": {"prompt", "response"}, "messages": {"messages"}, "text": {"text"}}[kind]
    out = []
    for i, rec, raw, why in chunk:
        if rec is None:
            out.append(RowVerdict(i, None, raw, why))
            continue
        raw = json.dumps({k: describe(v) for k, v in rec.items()}, ensure_ascii=False)
        sample, why = check_row(rec, kind, i, source)
        if sample is not None and sample.kind == "messages" and not any(
                m["role"] == "assistant" for m in sample.messages or ()):
            # the response loss (chat's default) counts assistant turns only: such a row can never be valued
            sample, why = None, "messages: no assistant turn"
        if sample is not None:
            size = sum(len(x) for x in (sample.prompt, sample.response, sample.text) if x) + sum(
                len(m["content"]) if isinstance(m["content"], str)
                else sum(len(p.get("text", "")) for p in m["content"]) for m in (sample.messages or ()))
            if size > max_chars:
                sample, why = None, f"{sample.longest_field}: oversized ({size} characters > {max_chars})"
        meta = encode_metadata({k: v for k, v in rec.items() if k not in sample_cols}, types) if sample else None
        if meta is not None and "images" in rec:
            # the release carries the images by content hash (resolved in the workspace's image table)
            meta["images"] = list(sample.images or ())
        out.append(RowVerdict(i, sample, raw, why, meta))
    return out


def iter_source_verdicts(path: str | Path, max_chars: int, chunk_rows: int = 50_000) -> Iterator[list[RowVerdict]]:
    """Every row of a source with its verdict, chunk by chunk; nothing dropped.

    The sample shape is decided by the columns of the first chunk that has a parsed row; later rows
    lacking those columns are refused with the field named.
    """
    kind: SampleKind | None = None
    pending: list[list[RawRow]] = []
    types: dict[str, Any] = {}
    for chunk in iter_source_records(path, chunk_rows, types):
        if kind is None:
            cols = sorted({k for _, r, _, _ in chunk if r is not None for k in r})
            if not cols:
                pending.append(chunk)
                continue
            kind = sample_kind(cols, str(path))
        for c in [*pending, chunk]:
            yield verdicts_for(c, kind, str(path), max_chars, types)
        pending = []
    for c in pending:  # a file of nothing but unparseable lines and empty objects
        yield [RowVerdict(i, None, raw if rec is None else "{}", why or "no sample fields: an empty object")
               for i, rec, raw, why in c]


def read_source_rows(path: str | Path, max_chars: int) -> list[RowVerdict]:
    """All rows of a source with their verdicts (see :func:`iter_source_verdicts`), in one list."""
    return [v for chunk in iter_source_verdicts(path, max_chars) for v in chunk]


# the counts of ingesting a source, summed over the sources by the ingest step: rows read, kept (accepted
# into the dataset), new samples, duplicates, quarantined, ids left
INGEST_COUNTS = ("rows", "kept", "new_samples", "duplicates", "quarantined", "left")


@dataclass
class FileReport:
    """What ingesting one source did (the counts are :data:`INGEST_COUNTS`)."""

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


def ingest_file(ws: Any, dataset: str, path: str | Path, max_chars: int, chunk_rows: int = 50_000) -> FileReport:
    """Ingest one source into ``dataset`` of workspace ``ws``, streaming it in chunks of rows.

    Re-ingesting an unchanged file is a no-op; a changed file replaces the source's rows: new contents
    are added, and ids that only the old version held are recorded as left. Rows are upserted on their
    row key, the rows of other versions of the file are deleted after the new ones are written, and the
    completion record is written last: a crash in between makes the next run redo the whole file without
    duplicates (its "left" list is then computed against what the crashed run had written), and two
    ingests of the same file at once never leave the source empty or doubled.
    """
    import datetime as dt
    from collections import Counter

    import pyarrow as pa

    from valuegate.storage import samples as store
    from valuegate.storage import schemas

    if not Path(path).exists():  # before hashing it: one line naming the file, never an OSError
        raise ValuegateError(f"{path}: no such file")
    check_name(dataset, "dataset")
    source = str(Path(path).resolve())
    digest = file_hash(path)
    last = store.read_last_ingest(ws, dataset, source)
    if last is not None and last["source_hash"] == digest:
        return FileReport(source, unchanged=True)
    now = dt.datetime.now(dt.timezone.utc)
    old_members = store.read_members(ws, dataset, columns=["id", "source"]).to_pylist()
    other_ids = {m["id"] for m in old_members if m["source"] != source}
    old_ids = {m["id"] for m in old_members if m["source"] == source}
    del old_members
    rep = FileReport(source, reasons={})
    reasons: Counter[str] = Counter()
    seen: set[str] = set()
    for verdicts in iter_source_verdicts(path, max_chars, chunk_rows):
        kept = [v for v in verdicts if v.sample is not None]
        refused = [v for v in verdicts if v.sample is None]
        records = [sample_record(v.sample) for v in kept]
        ids = [sample_id(r) for r in records]
        known = store.known_sample_ids(ws, sorted(set(ids)))
        fresh: dict[str, dict[str, Any]] = {}
        for sid, rec in zip(ids, records, strict=True):
            if sid not in known and sid not in fresh:
                fresh[sid] = {"id": sid, **rec, "first_seen": now}
        _store_images(ws, [v.sample for v, sid in zip(kept, ids, strict=True) if v.sample.images and sid in fresh])
        store.write_samples(ws, pa.Table.from_pylist(list(fresh.values()), schema=schemas.samples_schema))
        # upserts on the row key: a concurrent ingest of the same source (two runs at once) cannot
        # leave a row twice
        store.write_quarantine(ws, [
            {"key": store.row_key(dataset, source, v.row), "dataset": dataset, "source": source,
             "row": v.row, "source_hash": digest, "raw": v.raw, "reason": v.reason, "at": now} for v in refused])
        store.write_members(ws, [
            {"key": store.row_key(dataset, source, v.row), "dataset": dataset, "source": source,
             "row": v.row, "id": sid,
             "metadata": json.dumps(v.metadata, ensure_ascii=False, sort_keys=True), "source_hash": digest}
            for v, sid in zip(kept, ids, strict=True)])
        for sid in ids:
            rep.duplicates += sid in seen or sid in other_ids
            seen.add(sid)
        rep.rows += len(verdicts)
        rep.kept += len(kept)
        rep.new_samples += len(fresh)
        rep.quarantined += len(refused)
        reasons.update(_reason_key(v.reason) for v in refused)
    # the rows an earlier version of the file left (after the new ones are in: a concurrent ingest of the
    # same file never sees the source empty)
    for table in (schemas.MEMBERS, schemas.QUARANTINE):
        store.delete_stale_source_rows(ws, table, dataset, source, digest)
    left = sorted(old_ids - seen - other_ids)
    rep.left, rep.reasons = len(left), dict(reasons)
    store.write_ingest_record(ws, {
        "dataset": dataset, "source": source, "source_hash": digest, "at": now, "rows": rep.rows,
        "kept": rep.kept, "new_samples": rep.new_samples, "duplicates": rep.duplicates,
        "quarantined": rep.quarantined, "left_ids": left})
    return rep


def _store_images(ws: Any, samples: list[Sample]) -> None:
    """Put the images of new samples into the workspace's image table (before the samples that name them)."""
    if samples:
        from valuegate.storage.images import store_sample_images

        store_sample_images(ws, samples)


# --------------------------------------------------------------------------------------------------
# The ``ingest`` step of the refresh DAG
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestResult:
    """What the ``ingest`` step did (:func:`run`); plain JSON once ``dataclasses.asdict``-ed.

    Attributes:
        rows, kept, new_samples, duplicates, quarantined, left (int): this call's counts, summed over the
            sources (:class:`FileReport`; an unchanged source adds nothing).
        dataset_rows (int): the dataset's rows as it stands.
        dataset_quarantined (int): its quarantined rows as it stands.
        dataset_fp (str): sha256 of its sorted distinct ids (what scoring is keyed on).
    """

    rows: int
    kept: int
    new_samples: int
    duplicates: int
    quarantined: int
    left: int
    dataset_rows: int
    dataset_quarantined: int
    dataset_fp: str


def run(settings: Settings, on_file: Callable[[FileReport], None] | None = None) -> IngestResult:
    """Ingest every configured source (``settings.data.sources``) into ``settings.data.dataset``
    (unchanged files are no-ops); ``on_file`` is called with each file's report as it is done.

    Raises:
        ValuegateError: no source configured, or a source that cannot be read.
    """
    from valuegate.storage.lance import Workspace
    from valuegate.storage.samples import ensure_sample_tables, read_members, read_quarantine

    ws = Workspace.from_env(settings.workspace)
    ensure_sample_tables(ws)
    if not settings.data.sources:
        raise ValuegateError("no sources configured: set data.sources (a list of files) in the config")
    totals = dict.fromkeys(INGEST_COUNTS, 0)
    for src in settings.data.sources:
        rep = ingest_file(ws, settings.data.dataset, src, settings.ingest.max_chars)
        if on_file is not None:
            on_file(rep)
        for k in INGEST_COUNTS:
            totals[k] += getattr(rep, k)
    # the dataset as it stands (unchanged sources add nothing this run, but their rows still count)
    ids = read_members(ws, settings.data.dataset, columns=["id"])["id"].to_pylist()
    return IngestResult(**totals, dataset_rows=len(ids),
                        dataset_quarantined=read_quarantine(ws, settings.data.dataset).num_rows,
                        dataset_fp=hashlib.sha256("\n".join(sorted(set(ids))).encode()).hexdigest())
