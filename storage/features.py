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
import pyarrow.compute as pc

from valuegate.engine.quantize import dequantize_rows, stored_int8
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace, sql_str

# the sparse rows' stored dtype (int8 steps, feature format 6; the readers here return them in float32),
# the sketch's and the mean hidden state's (float16, upcast by their readers)
STORED_DTYPE = np.dtype(schemas.STORED_ROW_DTYPE)
SKETCH_DTYPE = np.dtype(schemas.SKETCH_DTYPE)
HIDDEN_DTYPE = np.dtype(schemas.HIDDEN_DTYPE)
# row columns and the scale column each is stored with
SCALED_COLUMNS = {"rows": "rows_scale", "hard_rows": "hard_rows_scale"}
# fingerprint settings of side columns only (the sketch, new in format 5; the pooled error vector): no
# stored value of a row depends on them, so a registration that differs in them alone (or lacks them) holds
# the same features in another format
SIDE_SETTINGS = ("sketch_dim", "error_dim")


def features_uri(ws: Workspace, model_fp: str) -> str:
    """Where the feature table of a fingerprint lives."""
    return f"{ws.uri}/{schemas.features_table(model_fp)}.lance"


def features_exist(ws: Workspace, model_fp: str) -> bool:
    """Whether a feature table exists for the fingerprint."""
    return ws.table_exists(schemas.features_table(model_fp))


def ensure_feature_set(ws: Workspace, model_fp: str, settings: dict, hidden_size: int, vocab_size: int,
                       row_width: int, error_dim: int, sketch_dim: int = 0) -> str:
    """Register a fingerprint (once) and create its feature table (with a ``sketch`` column of
    ``sketch_dim`` floats when > 0). Returns the table name."""
    ws.ensure(schemas.FEATURE_SETS, schemas.feature_sets_schema)
    table = schemas.features_table(model_fp)
    if ws.count(schemas.FEATURE_SETS, f"model_fp = {sql_str(model_fp)}") == 0:
        # insert-if-absent: a concurrent registration of the same fingerprint keeps one row
        ws.upsert(schemas.FEATURE_SETS, pa.Table.from_pylist([{
            "model_fp": model_fp, "table": table, "settings": json.dumps(settings, sort_keys=True),
            "hidden_size": hidden_size, "vocab_size": vocab_size, "row_width": row_width,
            "error_dim": error_dim, "created": dt.datetime.now(dt.timezone.utc)}],
            schema=schemas.feature_sets_schema), on="model_fp", update=False)
    ws.ensure(table, schemas.features_schema(hidden_size, error_dim, sketch_dim))
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
        settings: the fingerprint settings (:func:`~valuegate.engine.model.fingerprint_settings`). The
            side columns' widths (:data:`SIDE_SETTINGS`: ``sketch_dim``, new in format 5, and ``error_dim``,
            both defaulting to 0 since format 6) are not compared.
    """
    if not ws.table_exists(schemas.FEATURE_SETS):
        return None
    rest = json.loads(json.dumps({k: v for k, v in settings.items() if k not in ("format", *SIDE_SETTINGS)},
                                 sort_keys=True))
    found = []
    for text in ws.read(schemas.FEATURE_SETS, columns=["settings"])["settings"].to_pylist():
        other = {k: v for k, v in json.loads(text).items() if k not in SIDE_SETTINGS}
        fmt = other.pop("format", None)
        if isinstance(fmt, int) and fmt < settings["format"] and other == rest:
            found.append(fmt)
    return max(found, default=None)


def feature_ids(ws: Workspace, model_fp: str) -> set[str]:
    """Ids that have features for the fingerprint."""
    if not features_exist(ws, model_fp):
        return set()
    return set(ws.read(schemas.features_table(model_fp), columns=["id"])["id"].to_pylist())


def truncated_ids(ws: Workspace, model_fp: str, ids: list[str]) -> list[str]:
    """The ``ids`` whose stored features are of a sample cut at ``max_length`` (``truncated`` true)."""
    if not ids or not features_exist(ws, model_fp):
        return []
    t = ws.read_by_key(schemas.features_table(model_fp), "id", ids, ["id", "truncated"])
    return [i for i, cut in zip(t["id"].to_pylist(), t["truncated"].to_pylist(), strict=True) if cut]


def _stored_precision(row: dict) -> dict:
    """``row`` in the stored form: ``rows``/``hard_rows`` as the bytes of their int8 steps with their
    ``*_scale`` (the extraction's rounded rows and scales give back the same steps exactly,
    :func:`valuegate.engine.extraction.stored_features`; other writers' float rows are rounded here), the
    ``sketch`` and ``mean_hidden`` in float16.

    Raises:
        ValueError: a sketch or mean hidden value beyond float16's range (it would be stored as infinity),
            or int8 rows without their scales, naming the id.
    """
    out = dict(row)
    for col, tok in (("rows", "token_ids"), ("hard_rows", "hard_token_ids")):
        v = row.get(col)
        if v is None or isinstance(v, bytes):
            continue
        if getattr(v, "dtype", None) == STORED_DTYPE:  # int8 steps already (with their scales)
            if row.get(f"{col}_scale") is None:
                raise ValueError(f"feature row {row.get('id')!r}: its {col} are int8 steps without "
                                 f"{col}_scale (a step per support entry)")
            out[col] = np.ascontiguousarray(v).tobytes()
            continue
        q, scale = stored_int8(v, len(row[tok]), row.get(f"{col}_scale"))
        out[col], out[f"{col}_scale"] = q.tobytes(), scale
    for col, dtype in (("sketch", SKETCH_DTYPE), ("mean_hidden", HIDDEN_DTYPE)):
        v = row.get(col)
        if v is None or getattr(v, "dtype", None) == dtype:
            continue
        with np.errstate(over="ignore"):  # checked below
            r = np.asarray(v, dtype=np.float32).astype(dtype)
        if not np.isfinite(r).all():
            raise ValueError(f"feature row {row.get('id')!r}: its {col} holds a value beyond the range of "
                             f"{dtype} ({float(np.abs(np.asarray(v)).max()):.4g})")
        out[col] = r
    return out


def write_features(ws: Workspace, model_fp: str, rows: list[dict], hidden_size: int, error_dim: int,
                   sketch_dim: int = 0) -> int:
    """Insert one batch of feature rows (one commit), each only if its id has no row yet: rows another
    process committed meanwhile are kept as they are (extraction is deterministic, so they hold the same
    features), never stored twice. ``rows`` must have distinct ids; ``sketch_dim``: the width of their
    ``sketch`` (0: none). Returns the table version."""
    schema = schemas.features_schema(hidden_size, error_dim, sketch_dim)
    table = schemas.features_table(model_fp)
    ws.ensure(table, schema)
    data = pa.Table.from_pylist([_stored_precision(r) for r in rows], schema=schema)
    return ws.upsert(table, data, on="id", update=False)


def read_features(ws: Workspace, model_fp: str, ids: list[str] | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """Feature rows: all, or those of ``ids`` (each once; ids without a row are left out). No order is
    guaranteed (storage order today): align on the ``id`` column.

    Reads by id cost one scan of the ``id`` column per table version (cached in the workspace) plus
    the rows asked for, so reading a table chunk by chunk is linear in its size
    (:meth:`Workspace.read_by_key`; ``bench_store --only storage`` measures it).
    """
    table = schemas.features_table(model_fp)
    fetch = with_scales(columns)
    t = ws.read(table, columns=fetch) if ids is None else ws.read_by_key(table, "id", ids, fetch)
    return dequantized(t, columns)


def iter_features(ws: Workspace, model_fp: str, columns: list[str], batch_rows: int = 8192,
                  steps: bool = False):
    """Stream all feature rows of a fingerprint in storage order, ``batch_rows`` at a time.

    For a pass over every row (the ``mean`` aggregate of a whole table): one sequential scan, peak
    memory bounded by ``batch_rows``, not by the table.

    Args:
        steps: leave the row columns as stored (int8 steps, :func:`row_steps`) and add their scale
            columns, for a caller that multiplies the steps itself; else float32 rows as from
            :func:`read_features`.

    Yields:
        :class:`pyarrow.RecordBatch` of ``columns``, at most ``batch_rows`` rows each.
    """
    tbl = ws.open(schemas.features_table(model_fp))
    reader = tbl.search().select(with_scales(columns)).to_batches(batch_rows)
    for batch in reader:
        if batch.num_rows:
            yield batch if steps else dequantized(batch, columns)


def with_scales(columns: list[str] | None) -> list[str] | None:
    """``columns`` and the scale column of every row column among them (None: every column)."""
    if columns is None:
        return None
    cols = list(columns)
    return cols + [SCALED_COLUMNS[c] for c in cols if c in SCALED_COLUMNS and SCALED_COLUMNS[c] not in cols]


def dequantized(t, columns: list[str] | None = None):
    """A feature table or record batch with its int8 row columns as float32 rows (``q · scale`` per
    support entry, :func:`valuegate.engine.quantize.dequantize_rows`), and only ``columns`` (None: all
    read). Row columns already in a float type (tables of an older format) are left as they are."""
    names = t.schema.names
    arrays = {n: t.column(n) for n in names}
    fields = {n: t.schema.field(n) for n in names}
    for col, scale_col in SCALED_COLUMNS.items():
        if col not in arrays or scale_col not in arrays or not _holds_steps(fields[col].type):
            continue
        arrays[col] = _dequantize_column(arrays[col], arrays[scale_col])
        fields[col] = pa.field(col, pa.list_(pa.float32()), fields[col].nullable)
    keep = [n for n in names if columns is None or n in columns]
    schema = pa.schema([fields[n] for n in keep])
    if isinstance(t, pa.RecordBatch):
        return pa.RecordBatch.from_arrays([_one_chunk(arrays[n]) for n in keep], schema=schema)
    return pa.Table.from_arrays([arrays[n] for n in keep], schema=schema)


def _holds_steps(typ: pa.DataType) -> bool:
    """Whether a row column of this type holds int8 steps (``binary`` since format 7, ``list<int8>`` in 6)."""
    return pa.types.is_binary(typ) or (pa.types.is_list(typ) and pa.types.is_int8(typ.value_type))


def _one_chunk(a):
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def row_steps(rows) -> tuple[np.ndarray, np.ndarray]:
    """The int8 steps of a stored row column (``binary``, or format 6's ``list<int8>``; a null row holds
    none).

    Returns:
        ``(offsets (n+1,) int64 from 0, steps (offsets[-1],) int8)``: row i's steps are
        ``steps[offsets[i]:offsets[i+1]]`` (zero-copy views of the column's buffers where possible).
    """
    rows = _one_chunk(rows)
    if len(rows) == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int8)
    if rows.null_count:
        rows = pc.if_else(rows.is_null(), pa.scalar(b"" if pa.types.is_binary(rows.type) else [],
                                                   type=rows.type), rows)
    if pa.types.is_binary(rows.type):
        off = np.frombuffer(rows.buffers()[1], dtype=np.int32)[rows.offset:rows.offset + len(rows) + 1]
        data = np.frombuffer(rows.buffers()[2], dtype=np.int8) if off[-1] > off[0] else np.zeros(0, np.int8)
        return off.astype(np.int64) - int(off[0]), data[off[0]:off[-1]]
    off = rows.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    return off - off[0], rows.flatten().to_numpy(zero_copy_only=False)


def _dequantize_column(rows, scales) -> pa.Array:
    """Stored int8 rows (:func:`row_steps`) and their ``list<float32>`` scales as one ``list<float32>``
    array (nulls kept)."""
    rows, scales = _one_chunk(rows), _one_chunk(scales)
    off, q = row_steps(rows)
    s = scales.flatten().to_numpy(zero_copy_only=False)
    values = np.zeros(0, dtype=np.float32)
    if s.size:
        if q.size % s.size:
            raise ValueError(f"feature rows hold {q.size} values for {s.size} scales")
        values = dequantize_rows(q, s).reshape(-1)
    return pa.ListArray.from_arrays(pa.array(off, type=pa.int32()), pa.array(values, type=pa.float32()),
                                    mask=rows.is_null() if rows.null_count else None)


def sparse_arrays(t: pa.Table, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse rows of a feature table slice as CSR parts, with no Python loop over samples.

    Returns:
        ``indptr (n+1,)`` int64, ``indices (nnz,)`` int64 column ids ``token·width + j`` and
        ``data (nnz,)`` float32 (the stored int8 steps times their scales, as the readers return them), for an ``(n, V·width)`` CSR matrix.
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
