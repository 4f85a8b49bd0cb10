"""The ``ingest`` step: stream every configured source into the workspace's samples, members and quarantine.

Reading files and recognising their format is :mod:`valuegate.inputs` (readers, formats, row checks);
this module normalises the samples, gives them content ids (:func:`sample_id`), carries every other
column as metadata and stores kept and refused rows (``storage/samples.py``). A source in
``data.sources`` may be a file, a ``save_to_disk`` folder, a folder of shards or a glob: each file it
names is ingested as a source of its own (:func:`valuegate.inputs.readers.source_files`).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valuegate.digests import sha256_path
from valuegate.engine.sample import Sample
from valuegate.errors import ValuegateError
from valuegate.inputs.formats import Format, recognise
from valuegate.inputs.readers import RawRow, iter_source_records, source_files
from valuegate.inputs.rows import row_sample
from valuegate.names import check_name
from valuegate.settings import Settings

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



def verdicts_for(chunk: list[RawRow], fmt: Format, source: str, max_chars: int,
                 types: dict[str, Any] | None = None) -> list[RowVerdict]:
    """Check every row of a chunk of a file of format ``fmt`` (see :func:`valuegate.inputs.rows.row_sample`),
    adding the oversize and the assistant-turn checks. A kept row's other columns become its metadata
    (:func:`valuegate.storage.metadata.encode_metadata`; ``types``: the Arrow type of each column, when the
    source has them)."""
    from valuegate.storage.metadata import describe, encode_metadata

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
            sample, why = None, f"{'conversations' if fmt.name == 'sharegpt' else 'messages'}: no assistant turn"
        if sample is not None:
            size = sum(len(x) for x in (sample.prompt, sample.response, sample.text) if x) + sum(
                len(m["content"]) if isinstance(m["content"], str)
                else sum(len(p.get("text", "")) for p in m["content"]) for m in (sample.messages or ()))
            if size > max_chars:
                sample, why = None, f"{sample.longest_field}: oversized ({size} characters > {max_chars})"
        meta = encode_metadata({k: v for k, v in rec.items() if k not in sample_cols}, types) if sample else None
        images_col = fmt.source_name("images")
        if meta is not None and images_col in rec:
            # the release carries the images by content hash (resolved in the workspace's image table)
            meta.pop(images_col, None)
            meta["images"] = list(sample.images or ())
        out.append(RowVerdict(i, sample, raw, why, meta))
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
        yield [RowVerdict(i, None, raw if rec is None else "{}", why or "no sample fields: an empty object")
               for i, rec, raw, why in c]


def read_source_rows(path: str | Path, max_chars: int, fields: dict[str, str] | None = None) -> list[RowVerdict]:
    """All rows of a source with their verdicts (see :func:`iter_source_verdicts`), in one list."""
    return [v for chunk in iter_source_verdicts(path, max_chars, fields=fields) for v in chunk]


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


def ingest_file(ws: Any, dataset: str, path: str | Path, max_chars: int, chunk_rows: int = 50_000,
                fields: dict[str, str] | None = None) -> FileReport:
    """Ingest one source file into ``dataset`` of workspace ``ws``, streaming it in chunks of rows
    (``fields``: the column mapping, :mod:`valuegate.inputs.formats`; part of the file's content hash, so a
    changed mapping re-reads the file).

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
    if fields:
        digest = hashlib.sha256(f"{digest}\n{json.dumps(fields, sort_keys=True)}".encode()).hexdigest()
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
    for verdicts in iter_source_verdicts(path, max_chars, chunk_rows, fields):
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
    files = [f for src in settings.data.sources for f in source_files(src)]  # folders and globs, expanded
    for f in files:
        rep = ingest_file(ws, settings.data.dataset, f, settings.ingest.max_chars, fields=settings.data.fields)
        if on_file is not None:
            on_file(rep)
        for k in INGEST_COUNTS:
            totals[k] += getattr(rep, k)
    # the dataset as it stands (unchanged sources add nothing this run, but their rows still count)
    ids = read_members(ws, settings.data.dataset, columns=["id"])["id"].to_pylist()
    return IngestResult(**totals, dataset_rows=len(ids),
                        dataset_quarantined=read_quarantine(ws, settings.data.dataset).num_rows,
                        dataset_fp=hashlib.sha256("\n".join(sorted(set(ids))).encode()).hexdigest())
