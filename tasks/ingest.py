"""The ``ingest`` step: stream every configured source into the workspace's samples, members and quarantine.

Reading files, recognising their format and judging each row is :mod:`valuegate.inputs` (readers, formats,
row checks and verdicts, sample identity); this module stores what they give: new samples by content id,
every row's membership with its other columns as metadata, refused rows in quarantine
(``storage/samples.py``), and removes the rows an earlier version of a file left. A source in
``data.sources`` may be a file, a ``save_to_disk`` folder, a folder of shards or a glob: each file it
names is ingested as a source of its own (:func:`valuegate.inputs.readers.source_files`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valuegate.digests import sha256_path
from valuegate.engine.sample import Sample
from valuegate.errors import ValuegateError
from valuegate.inputs.identity import sample_id, sample_record
from valuegate.inputs.readers import source_files
from valuegate.inputs.verdicts import iter_source_verdicts
from valuegate.names import check_name
from valuegate.settings import Settings

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
    from valuegate.storage.metadata import encode_metadata

    if not Path(path).exists():  # before hashing it: one line naming the file, never an OSError
        raise ValuegateError(f"{path}: no such file")
    check_name(dataset, "dataset")
    source = str(Path(path).resolve())
    digest = sha256_path(path)
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
             "metadata": json.dumps(encode_metadata(v.extra, v.types), ensure_ascii=False, sort_keys=True),
             "source_hash": digest}
            for v, sid in zip(kept, ids, strict=True)])
        for sid in ids:
            rep.duplicates += sid in seen or sid in other_ids
            seen.add(sid)
        rep.rows += len(verdicts)
        rep.kept += len(kept)
        rep.new_samples += len(fresh)
        rep.quarantined += len(refused)
        reasons.update(v.problem.kind for v in refused if v.problem is not None)
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
    from valuegate.storage.samples import ensure_sample_tables, read_members, read_quarantine
    from valuegate.storage.store import open_store

    ws = open_store(settings.workspace)
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
