"""Files and folders as chunks of raw rows, never holding a whole file (docs/your-data.md).

What is read (by suffix; a folder by what it holds):

- JSON lines (``.jsonl``, ``.ndjson``, and ``.json`` whose first character is ``{``): one object per
  non-empty line, read line by line; a bad line is refused with its reason, the others are read;
- a JSON array (``.json`` whose first character is ``[``, as Alpaca and ShareGPT sets ship): the whole
  array is parsed once, each element one row (an element that is no object is refused);
- CSV: every column as text (no silent casts), through Arrow's streaming reader;
- Parquet: by row-group batches; Arrow IPC (``.arrow``): by record batch;
- a ``datasets`` ``save_to_disk`` folder (``state.json`` beside Arrow files): its Arrow files in order;
- a folder of shards or a glob (``data/*.jsonl``): :func:`source_files` expands it into its files, each
  read (and ingested) as a source of its own.

Rows are numbered from 0 in each file (over the non-empty lines of JSON lines).
"""

from __future__ import annotations

import codecs
import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from valuegate.engine.sample import Problem
from valuegate.errors import ValuegateError

READABLE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv", ".arrow")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
GLOB_CHARS = "*?["

RawRow = tuple[int, "dict[str, Any] | None", str, "Problem | None"]  # (row, record or None, raw if refused, why)


def is_hf_folder(p: Path) -> bool:
    """A ``datasets`` ``save_to_disk`` folder (a Dataset's ``state.json``, or a DatasetDict's ``dataset_dict.json``)."""
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def source_files(spec: str | Path) -> list[Path]:
    """The files a configured source names: a file (itself), a ``save_to_disk`` folder (itself), a folder of
    shards (every readable file under it, sorted by path, hidden ones left out) or a glob pattern (its
    matches, sorted).

    Raises:
        ValuegateError: nothing exists there, the folder holds no readable file, or the glob matches none.
    """
    s = str(spec)
    if any(c in s for c in GLOB_CHARS) and not Path(s).exists():
        found = sorted(Path(m) for m in glob.glob(s, recursive=True))
        found = [p for p in found if is_hf_folder(p) or (p.is_file() and p.suffix.lower() in READABLE_SUFFIXES)]
        if not found:
            raise ValuegateError(f"{s}: no file matches (readable: {', '.join(READABLE_SUFFIXES)}, or a "
                                 "save_to_disk folder)")
        return found
    p = Path(s)
    if not p.exists():
        raise ValuegateError(f"{p}: no such file")
    if not p.is_dir() or is_hf_folder(p):
        return [p]
    found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in READABLE_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not found:
        raise ValuegateError(f"{p}: a folder with no data file ({', '.join(READABLE_SUFFIXES)}) and not a "
                             "save_to_disk folder (no state.json)")
    return found


def is_json_array(p: Path) -> bool:
    """Whether a JSON file holds one array (its first character past a BOM and blanks is ``[``)."""
    with p.open("rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"[")


def read_json_array(p: Path) -> list[RawRow]:
    """Every element of a JSON array file as a row; an element that is no object is refused.

    Raises:
        ValuegateError: the file is not valid JSON (with the line and column), or not an array.
    """
    raw = p.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValuegateError(f"{p}: invalid UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise ValuegateError(f"{p}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, list):
        raise ValuegateError(f"{p}: expected a JSON array of objects, got {type(data).__name__}")
    out: list[RawRow] = []
    for i, obj in enumerate(data):
        if isinstance(obj, dict):
            out.append((i, obj, "", None))
        else:
            out.append((i, None, json.dumps(obj, ensure_ascii=False)[:1000],
                        Problem("element", "expected a JSON object", f" {i}", f"got {type(obj).__name__}")))
    return out


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
    """Stream one file (or ``save_to_disk`` folder) in chunks of rows: JSONL line by line, a JSON array
    parsed once, Parquet by row group batches, CSV through Arrow's streaming reader (every column as text),
    Arrow IPC by batch.

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
        out: list[RawRow] = [(row + i, r, "", None) for i, r in enumerate(records)]
        row += len(records)
        return out

    try:
        if p.is_dir() or suffix == ".arrow":
            for recs in _arrow_batches(_hf_files(p), chunk_rows, types):
                yield numbered(recs)
        elif suffix == ".json" and is_json_array(p):
            rows = read_json_array(p)
            for lo in range(0, len(rows), chunk_rows):
                yield rows[lo:lo + chunk_rows]
        elif suffix in JSON_SUFFIXES:
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
                                 + ", ".join(READABLE_SUFFIXES) + " or a save_to_disk folder")
    except ValuegateError:
        raise
    except Exception as exc:  # a reader's own error: name the file and the cause
        raise ValuegateError(f"{p}: cannot be read: {exc}") from exc


def _parse_json_line(raw: bytes, line_index: int) -> tuple[dict[str, Any] | None, Problem | None]:
    line = f" {line_index + 1}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, Problem("line", "invalid UTF-8", line, exc.reason)
    except json.JSONDecodeError as exc:
        return None, Problem("line", "malformed JSON", line, exc.msg)
    if not isinstance(obj, dict):
        return None, Problem("line", "expected a JSON object", line, f"got {type(obj).__name__}")
    if b"\\u" in raw and _has_lone_surrogate(obj):  # "\ud800" parses, but is no character: no text holds it
        return None, Problem("line", "invalid Unicode", line, "a lone surrogate escape")
    return obj, None


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row of a source (a file, a ``save_to_disk`` folder, a folder of shards or a glob, shards in
    order) as parsed records, for in-memory scoring (``valuegate score``, :func:`valuegate.score`).

    Returns:
        the records, and the Arrow type of each column where the source has them.

    Raises:
        ValuegateError: a row that does not parse (file, row and reason), or a source that cannot be read.
    """
    records: list[dict[str, Any]] = []
    types: dict[str, Any] = {}
    for f in source_files(path):
        for chunk in iter_source_records(f, types=types):
            for row, rec, _, why in chunk:
                if rec is None:
                    why = why or Problem("row", "cannot be read")
                    raise ValuegateError(f"{f}: row {row} ({why.field}{why.at}): {why.words}")
                records.append(rec)
    return records, types
