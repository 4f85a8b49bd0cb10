"""Feature tables: one ``features__<fp>`` table per model fingerprint, registered in ``feature_sets``.

Rows are written in numbered batches, each one commit: an interrupted extraction keeps every finished
batch, and the next run extracts only the ids that have no row (no duplicate, nothing lost).

Exactly once: every write is an insert-if-absent on the table's key (``merge_insert`` on the unenforced
primary key, see :meth:`Workspace.upsert`), so two processes that extract the same ids at once (two
overlapping runs on one workspace, a retried shard racing its zombie attempt) leave one row per
``(id, fingerprint)`` and one registry row per fingerprint, whichever commits first.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa

from valuegate.storage import schemas
from valuegate.storage.lance import Workspace, sql_in, sql_str


def features_uri(ws: Workspace, model_fp: str) -> str:
    """Where the feature table of a fingerprint lives."""
    return f"{ws.uri}/{schemas.features_table(model_fp)}.lance"


def features_exist(ws: Workspace, model_fp: str) -> bool:
    """Whether a feature table exists for the fingerprint."""
    return ws.table_exists(schemas.features_table(model_fp))


def ensure_feature_set(ws: Workspace, model_fp: str, settings: dict, hidden_size: int, vocab_size: int,
                       row_width: int, error_dim: int) -> str:
    """Register a fingerprint (once) and create its feature table. Returns the table name."""
    ws.ensure(schemas.FEATURE_SETS, schemas.feature_sets_schema)
    table = schemas.features_table(model_fp)
    if ws.count(schemas.FEATURE_SETS, f"model_fp = {sql_str(model_fp)}") == 0:
        # insert-if-absent: a concurrent registration of the same fingerprint keeps one row
        ws.upsert(schemas.FEATURE_SETS, pa.Table.from_pylist([{
            "model_fp": model_fp, "table": table, "settings": json.dumps(settings, sort_keys=True),
            "hidden_size": hidden_size, "vocab_size": vocab_size, "row_width": row_width,
            "error_dim": error_dim, "created": dt.datetime.now(dt.timezone.utc)}],
            schema=schemas.feature_sets_schema), on="model_fp", update=False)
    ws.ensure(table, schemas.features_schema(hidden_size, error_dim))
    return table


def read_feature_set(ws: Workspace, model_fp: str) -> dict | None:
    """The registry row of a fingerprint, or None."""
    if not ws.table_exists(schemas.FEATURE_SETS):
        return None
    rows = ws.read(schemas.FEATURE_SETS, where=f"model_fp = {sql_str(model_fp)}").to_pylist()
    return rows[0] if rows else None


def older_format(ws: Workspace, settings: dict) -> int | None:
    """The newest feature format older than ``settings["format"]`` under which features with otherwise the
    same fingerprint settings are registered (stored by an older valuegate: their table is not read, the
    samples are extracted again under the new fingerprint), or None.

    Args:
        settings: the fingerprint settings (:func:`~valuegate.engine.model.fingerprint_settings`).
    """
    if not ws.table_exists(schemas.FEATURE_SETS):
        return None
    rest = json.loads(json.dumps({k: v for k, v in settings.items() if k != "format"}, sort_keys=True))
    found = []
    for text in ws.read(schemas.FEATURE_SETS, columns=["settings"])["settings"].to_pylist():
        other = json.loads(text)
        fmt = other.pop("format", None)
        if isinstance(fmt, int) and fmt < settings["format"] and other == rest:
            found.append(fmt)
    return max(found, default=None)


def feature_ids(ws: Workspace, model_fp: str) -> set[str]:
    """Ids that have features for the fingerprint."""
    if not features_exist(ws, model_fp):
        return set()
    return set(ws.read(schemas.features_table(model_fp), columns=["id"])["id"].to_pylist())


def truncated_ids(ws: Workspace, model_fp: str, ids: list[str], chunk: int = 2000) -> list[str]:
    """The ``ids`` whose stored features are of a sample cut at ``max_length`` (``truncated`` true)."""
    if not ids or not features_exist(ws, model_fp):
        return []
    table = schemas.features_table(model_fp)
    out: list[str] = []
    for i in range(0, len(ids), chunk):
        where = f"truncated AND {sql_in('id', ids[i:i + chunk])}"
        out += ws.read(table, where=where, columns=["id"])["id"].to_pylist()
    return out


def write_features(ws: Workspace, model_fp: str, rows: list[dict], hidden_size: int, error_dim: int) -> int:
    """Insert one batch of feature rows (one commit), each only if its id has no row yet: rows another
    process committed meanwhile are kept as they are (extraction is deterministic, so they hold the same
    features), never stored twice. ``rows`` must have distinct ids. Returns the table version."""
    schema = schemas.features_schema(hidden_size, error_dim)
    table = schemas.features_table(model_fp)
    ws.ensure(table, schema)
    return ws.upsert(table, pa.Table.from_pylist(rows, schema=schema), on="id", update=False)


def read_features(ws: Workspace, model_fp: str, ids: list[str] | None = None,
                  columns: list[str] | None = None, chunk: int = 2000) -> pa.Table:
    """Feature rows (all, or of ``ids``; no order guaranteed: align on the ``id`` column)."""
    table = schemas.features_table(model_fp)
    if ids is None:
        return ws.read(table, columns=columns)
    parts = [ws.read(table, where=sql_in("id", ids[i:i + chunk]), columns=columns)
             for i in range(0, len(ids), chunk)]
    if not parts:
        return ws.read(table, where="false", columns=columns)
    return pa.concat_tables(parts)


def sparse_arrays(t: pa.Table, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse rows of a feature table slice as CSR parts, with no Python loop over samples.

    Returns:
        ``indptr (n+1,)`` int64, ``indices (nnz,)`` int64 column ids ``token·width + j`` and
        ``data (nnz,)`` float32, for an ``(n, V·width)`` CSR matrix.
    """
    tok = t.column("token_ids").combine_chunks()
    rows = t.column("rows").combine_chunks()
    tok_flat = tok.values.to_numpy(zero_copy_only=False).astype(np.int64)
    data = rows.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    lengths = np.diff(tok.offsets.to_numpy())
    indices = (tok_flat[:, None] * width + np.arange(width)[None, :]).reshape(-1)
    indptr = np.concatenate([[0], np.cumsum(lengths * width)]).astype(np.int64)
    if data.size != indices.size:
        raise ValueError(f"feature rows hold {data.size} values for {indices.size} support entries × width")
    return indptr, indices, data


def maybe_index_features(ws: Workspace, model_fp: str, min_rows: int, stale_fraction: float = 0.2) -> bool:
    """Build (or rebuild) the vector index on ``pooled_hidden`` once the table is large enough to need one.

    Below ``min_rows`` a brute-force search is as fast (see the store benchmark); above it the index is
    rebuilt when more than ``stale_fraction`` of the rows arrived after it was built (new rows are still
    found meanwhile, by brute force). Returns whether an index was built.
    """
    table = schemas.features_table(model_fp)
    rows = ws.count(table)
    if min_rows <= 0 or rows < min_rows:
        return False
    if (ws.has_vector_index(table, "pooled_hidden")
            and rows - ws.indexed_rows(table, "pooled_hidden") <= stale_fraction * rows):
        return False
    ws.create_vector_index(table, "pooled_hidden", metric="cosine")
    return True
