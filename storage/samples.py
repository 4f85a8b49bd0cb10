"""Samples, dataset membership, ingest records and quarantine in a workspace.

Write order of one file's ingest (each step idempotent, the ingest record last as the completion
record): new samples (merge on ``id``) → the file's quarantine rows (replaced) → the file's members
(replaced) → the ingest record. A crash anywhere before the record makes the next run redo the file
with no duplicate; after it, the next run of the unchanged file is a no-op.
"""

from __future__ import annotations

import pyarrow as pa

from valuegate.storage import schemas
from valuegate.storage.lance import sql_in, sql_str
from valuegate.storage.store import Store


def ensure_sample_tables(ws: Store) -> None:
    """Create the ingestion tables where missing."""
    ws.ensure(schemas.SAMPLES, schemas.samples_schema)
    ws.ensure(schemas.MEMBERS, schemas.members_schema)
    ws.ensure(schemas.INGESTS, schemas.ingests_schema)
    ws.ensure(schemas.QUARANTINE, schemas.quarantine_schema)


def _where_source(dataset: str, source: str) -> str:
    return f"dataset = {sql_str(dataset)} AND source = {sql_str(source)}"


def read_last_ingest(ws: Store, dataset: str, source: str) -> dict | None:
    """The latest completion record of ``source`` in ``dataset``, or None."""
    if not ws.table_exists(schemas.INGESTS):
        return None
    t = ws.read(schemas.INGESTS, where=_where_source(dataset, source))
    if t.num_rows == 0:
        return None
    rows = t.to_pylist()
    return max(rows, key=lambda r: r["at"])


def read_ingests(ws: Store, dataset: str | None = None) -> pa.Table:
    """Every ingest record (of one dataset)."""
    if not ws.table_exists(schemas.INGESTS):
        return schemas.ingests_schema.empty_table()
    return ws.read(schemas.INGESTS, where=None if dataset is None else f"dataset = {sql_str(dataset)}")


def read_members(ws: Store, dataset: str, source: str | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """Member rows of a dataset (or of one of its sources)."""
    if not ws.table_exists(schemas.MEMBERS):
        return schemas.members_schema.empty_table()
    where = f"dataset = {sql_str(dataset)}" if source is None else _where_source(dataset, source)
    return ws.read(schemas.MEMBERS, where=where, columns=columns)


def dataset_ids(ws: Store, dataset: str) -> list[str]:
    """The distinct sample ids currently in a dataset, sorted."""
    return sorted(set(read_members(ws, dataset, columns=["id"])["id"].to_pylist()))


def dataset_exists(ws: Store, dataset: str) -> bool:
    """Whether anything was ever ingested into ``dataset``."""
    return ws.table_exists(schemas.INGESTS) and ws.count(schemas.INGESTS, f"dataset = {sql_str(dataset)}") > 0


def known_sample_ids(ws: Store, ids: list[str], chunk: int = 2000) -> set[str]:
    """The subset of ``ids`` already in the ``samples`` table."""
    if not ids or not ws.table_exists(schemas.SAMPLES):
        return set()
    found: set[str] = set()
    for i in range(0, len(ids), chunk):
        t = ws.read(schemas.SAMPLES, where=sql_in("id", ids[i:i + chunk]), columns=["id"])
        found.update(t["id"].to_pylist())
    return found


def write_samples(ws: Store, rows: pa.Table) -> None:
    """Add sample contents, merging on ``id`` (the same content twice stays one row)."""
    if rows.num_rows:
        ws.upsert(schemas.SAMPLES, rows.cast(schemas.samples_schema), on="id", update=False)


def write_members(ws: Store, rows: list[dict]) -> None:
    """Upsert dataset membership rows (:data:`~valuegate.storage.schemas.members_schema`) on their row key
    (:func:`row_key`): a concurrent ingest of the same source (two runs at once) cannot leave a row twice."""
    if rows:
        ws.upsert(schemas.MEMBERS, pa.Table.from_pylist(rows, schema=schemas.members_schema), "key")


def write_quarantine(ws: Store, rows: list[dict]) -> None:
    """Upsert quarantined rows (:data:`~valuegate.storage.schemas.quarantine_schema`) on their row key."""
    if rows:
        ws.upsert(schemas.QUARANTINE, pa.Table.from_pylist(rows, schema=schemas.quarantine_schema), "key")


def read_samples_by_id(ws: Store, ids: list[str], chunk: int = 2000) -> pa.Table:
    """Sample contents for ``ids`` (in no particular order)."""
    parts = [ws.read(schemas.SAMPLES, where=sql_in("id", ids[i:i + chunk])) for i in range(0, len(ids), chunk)]
    return pa.concat_tables(parts) if parts else schemas.samples_schema.empty_table()


def first_rows(ws: Store, dataset: str, ids: list[str]) -> dict[str, tuple[str, int]]:
    """``{id: (source, row)}``: the first source row of ``dataset`` that holds each of ``ids`` (what a message
    about the sample names); an id no member row of the dataset holds is left out. One read of the dataset's
    members (three columns), however many ids."""
    if not ids or not ws.table_exists(schemas.MEMBERS):
        return {}
    wanted = set(ids)
    t = read_members(ws, dataset, columns=["id", "source", "row"])
    where: dict[str, tuple[str, int]] = {}
    for sid, source, row in zip(*(t[c].to_pylist() for c in ("id", "source", "row")), strict=True):
        if sid in wanted:
            where[sid] = min(where.get(sid, (source, row)), (source, row))
    return where


def delete_stale_source_rows(ws: Store, table: str, dataset: str, source: str, source_hash: str) -> int:
    """Delete the rows ``source`` of ``dataset`` holds in ``table`` (members or quarantine) from any other
    version of the file than ``source_hash``; returns how many there were."""
    where = f"{_where_source(dataset, source)} AND source_hash != {sql_str(source_hash)}"
    n = ws.count(table, where)
    if n:
        ws.delete(table, where)
    return n


def write_ingest_record(ws: Store, record: dict) -> None:
    """Append the completion record of one file's ingest."""
    ws.append(schemas.INGESTS, pa.Table.from_pylist([record], schema=schemas.ingests_schema),
              schemas.ingests_schema)


def read_quarantine(ws: Store, dataset: str | None = None) -> pa.Table:
    """Refused rows (of one dataset)."""
    if not ws.table_exists(schemas.QUARANTINE):
        return schemas.quarantine_schema.empty_table()
    return ws.read(schemas.QUARANTINE, where=None if dataset is None else f"dataset = {sql_str(dataset)}")


def row_key(dataset: str, source: str, row: int) -> str:
    """The one-column key of a source row in a dataset (``members`` and ``quarantine``).

    Rows are written by upsert on it, so two ingests of the same source at once (two refresh runs) leave
    each row once: LanceDB has no composite primary key, hence one string.
    """
    return f"{dataset}\x1f{source}\x1f{int(row)}"
