"""The workspace: one LanceDB database at a local path or an object-store URI (docs/ARCHITECTURE.md §3.1).

This is the only module that imports :mod:`lancedb`. Everything else asks a :class:`Workspace` for
tables, versions and tags and gets plain :class:`pyarrow.Table` objects back; :class:`Workspace` implements
:class:`valuegate.storage.store.Store`, the interface the steps need (:func:`~valuegate.storage.store.open_store`).

Behaviour of LanceDB 0.40 (lance 13) that this module relies on, each checked by running it:

* ``lancedb.connect`` on an ``s3://`` URI already does I/O (it lists the database prefix), so the
  connection opens lazily, on the first table operation.
* Concurrent appends (several processes, local disk or S3) never surface an error: Lance rebases an
  append over a concurrent append inside its own commit loop (on S3 a lost race is a ``412`` to the
  conditional ``PUT`` of the manifest, resolved silently). Concurrent ``merge_insert``/``delete``/
  ``update`` on distinct rows are rebased as well.
* What does surface is a transaction Lance cannot rebase (an append racing an overwrite or a restore)
  or an exhausted inner retry loop. Both arrive as a plain ``RuntimeError`` (sometimes ``ValueError``)
  whose message starts ``lance error: Incompatible transaction: ...``, ``Commit conflict for version``,
  ``Retryable commit conflict`` or ``Too many concurrent writers``; there is no dedicated exception
  class, so :func:`classify_error` reads the message. The table handle must be moved to the latest
  version before the retry (``checkout_latest``), otherwise the same stale read version fails forever.
* Transient object-store failures (connection refused/reset, timeouts, 5xx, ``SlowDown``) arrive as
  ``RuntimeError`` or ``ValueError`` too, after the object store's own three quick retries.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from valuegate.errors import DamagedTable, ValuegateError
from valuegate.storage import retry
from valuegate.storage.failures import store_failure
from valuegate.storage.retry import RetryPolicy, classify_error

if TYPE_CHECKING:
    from lancedb.db import DBConnection
    from lancedb.table import LanceTable

__all__ = [
    "RetryPolicy",
    "Workspace",
    "classify_error",
    "primary_key",
    "sql_in",
    "sql_str",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_WORKSPACE = "./valuegate-workspace"
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_OBJECT_STORE_SCHEMES = ("s3://", "s3+ddb://", "gs://", "az://", "abfs://", "memory://")


_KEY_MAPS_KEPT = 4  # key maps of read_by_key kept per workspace (tables × key columns)


# --------------------------------------------------------------------------------------------------
# SQL literals for `where` clauses
# --------------------------------------------------------------------------------------------------


def sql_str(value: str) -> str:
    """Quote ``value`` as a SQL string literal for a Lance ``where`` clause.

    Single quotes are doubled (``it's`` → ``'it''s'``); backslashes, ``%``/``_``, newlines and
    non-ASCII text need no escaping in Lance's (DataFusion) SQL and are kept as they are.

    Args:
        value: any text; a NUL character is refused (it cannot round-trip through the SQL parser).

    Returns:
        The literal, quotes included.
    """
    if not isinstance(value, str):
        raise TypeError(f"sql_str expects str, got {type(value).__name__}")
    if "\x00" in value:
        raise ValuegateError(f"cannot use a string with a NUL character in a filter: {value!r}")
    return "'" + value.replace("'", "''") + "'"


def sql_ident(column: str) -> str:
    """Quote a column name for a ``where`` clause with backticks (needed for spaces or dots in names)."""
    if "`" in column:
        raise ValuegateError(f"column name {column!r} contains a backtick and cannot be quoted")
    return f"`{column}`"


def _sql_literal(value: Any) -> str:
    if isinstance(value, str):
        return sql_str(value)
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            raise ValuegateError(f"cannot use a non-finite number in a filter: {value!r}")
        return repr(float(value))
    raise TypeError(f"unsupported filter value type {type(value).__name__}: {value!r}")


def sql_in(column: str, values: Iterable[str | int | float | bool]) -> str:
    """A ``column IN (v1, v2, ...)`` predicate; ``FALSE`` when ``values`` is empty.

    Scaling: the predicate is plain SQL text that Lance parses and plans on every query, so its cost
    grows linearly with the number of values — measured at about 5 µs per value (20,000 ids ≈ 0.1 s,
    100,000 ids ≈ 0.5 s and a 1.5 MB query string). Up to a few thousand ids it is free; beyond
    ~50,000, read the key column and filter with ``pyarrow.compute.is_in`` or cut the ids in chunks.

    Args:
        column: column name (quoted with backticks, so any name without a backtick works).
        values: strings, ints, floats or bools (one type per call is expected, not checked).

    Returns:
        The predicate text, e.g. ``"`id` IN ('a', 'b')"``.
    """
    literals = [_sql_literal(v) for v in values]
    if not literals:
        return "FALSE"
    return f"{sql_ident(column)} IN ({', '.join(literals)})"


# Retries: valuegate.storage.retry (RetryPolicy and classify_error are re-exported here).


def _key_bytes(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A string column as a numpy fixed-width bytes array (UTF-8), comparable and sortable."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise ValuegateError(f"the key column has {arr.null_count} null values")
    return np.asarray(arr.cast(pa.binary()).to_numpy(zero_copy_only=False), dtype=np.bytes_)


# --------------------------------------------------------------------------------------------------
# Workspace
# --------------------------------------------------------------------------------------------------


def _is_object_store(uri: str) -> bool:
    return uri.startswith(_OBJECT_STORE_SCHEMES) or ("://" in uri and not uri.startswith("file://"))


def _schema_differences(existing: pa.Schema, expected: pa.Schema) -> list[str]:
    """Human-readable differences between a table's schema and the expected one (names and types;
    nullability and metadata are not compared)."""
    have = {f.name: f for f in existing}
    want = {f.name: f for f in expected}
    diffs = [f"missing column {n!r} ({want[n].type})" for n in want if n not in have]
    diffs += [f"unexpected column {n!r} ({have[n].type})" for n in have if n not in want]
    diffs += [
        f"column {n!r} is {have[n].type}, expected {want[n].type}"
        for n in want
        if n in have and have[n].type != want[n].type
    ]
    return diffs


_PK_META = b"lance-schema:unenforced-primary-key:position"


def primary_key(schema: pa.Schema) -> list[str]:
    """The unenforced primary key recorded in a Lance table's schema (ordered column names; [] if none)."""
    keyed = [
        (int((f.metadata or {})[_PK_META]), f.name) for f in schema if f.metadata and _PK_META in f.metadata
    ]
    return [n for _, n in sorted(keyed)]


def _can_be_primary_key(schema: pa.Schema, keys: list[str]) -> bool:
    """Whether LanceDB accepts ``keys`` as primary key: one non-nullable string/integer/binary column."""
    if len(keys) != 1:
        return False
    f = schema.field(keys[0])
    t = f.type
    ok_type = (
        pa.types.is_int32(t)
        or pa.types.is_int64(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
    )
    return ok_type and not f.nullable


class Workspace:
    """One LanceDB database: a local directory or an object-store URI such as ``s3://bucket/prefix``.

    The connection opens on first use; table handles are cached per table and, by default, check for
    commits of other processes on every read (``read_consistency_s=0``), so a workspace shared by
    several workers always reads the latest version. Writes retry on commit conflicts and transient
    object-store errors according to ``retry``; :attr:`retry_counts` says how often that happened.

    A ``Workspace`` pickles (without its connection), so it can be handed to Dask/Ray workers. Start
    worker processes with ``spawn`` or ``forkserver``: a child *forked* from a process that used LanceDB
    may crash in native code (``malloc(): unaligned tcache chunk``, seen in 1 of 2 tries here), even
    though the workspace opens a fresh connection in the child.

    Args:
        uri: local directory (made absolute) or object-store URI.
        storage_options: object-store settings passed to LanceDB, e.g. ``aws_access_key_id``,
            ``aws_secret_access_key``, ``aws_endpoint``, ``aws_region``, ``allow_http``.
        retry: retry policy for commits and I/O; ``RetryPolicy()`` when ``None``.
        read_consistency_s: how stale a cached table handle may be, in seconds; ``0`` checks for
            new versions before every read, ``None`` never does (fastest, single-process only).
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        storage_options: dict[str, str] | None = None,
        *,
        retry: RetryPolicy | None = None,
        read_consistency_s: float | None = 0.0,
    ) -> None:
        uri = os.fspath(uri)
        if not uri:
            raise ValuegateError("the workspace URI is empty; give a directory or an s3:// URI")
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        if not _is_object_store(uri):
            uri = str(Path(uri).expanduser().absolute())
        self._uri = uri
        self._storage_options = dict(storage_options) if storage_options else None
        self._retry = retry or RetryPolicy()
        self._read_consistency_s = read_consistency_s
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._db: DBConnection | None = None
        self._tables: dict[str, LanceTable] = {}
        self._retry_counts = {"conflict": 0, "transient": 0}
        # (table, key column) -> (table version, sorted keys, their row offsets): see read_by_key
        self._key_maps: dict[tuple[str, str], tuple[int, np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {
            "uri": self._uri,
            "storage_options": self._storage_options,
            "retry": self._retry,
            "read_consistency_s": self._read_consistency_s,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._uri = state["uri"]
        self._storage_options = state["storage_options"]
        self._retry = state["retry"]
        self._read_consistency_s = state["read_consistency_s"]
        self._init_runtime()

    def __repr__(self) -> str:
        return f"Workspace({self._uri!r})"

    @classmethod
    def from_env(cls, uri: str | None = None, **kwargs: Any) -> Workspace:
        """A workspace configured from the environment.

        ``uri`` defaults to ``$VALUEGATE_WORKSPACE``, then ``./valuegate-workspace``. For an object-store
        URI the storage options come from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
        ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and ``AWS_REGION`` (else ``AWS_DEFAULT_REGION``);
        ``allow_http`` is set when the endpoint is ``http://`` (a local MinIO, say). Options not set
        are left to LanceDB, which reads the same variables and the usual AWS credential chain.

        Args:
            uri: workspace directory or URI; ``None`` reads the environment.
            **kwargs: passed on to :class:`Workspace` (``retry``, ``read_consistency_s``).
        """
        uri = uri or os.environ.get("VALUEGATE_WORKSPACE") or DEFAULT_WORKSPACE
        options: dict[str, str] = {}
        if _is_object_store(uri):
            from valuegate.storage.objstore import s3_options_from_env

            options = s3_options_from_env()
        return cls(uri, options or None, **kwargs)

    # ---------------------------------------------------------------- plumbing

    @property
    def uri(self) -> str:
        """The workspace URI (local paths absolute)."""
        return self._uri

    @property
    def storage_options(self) -> dict[str, str] | None:
        """A copy of the object-store options given at construction."""
        return dict(self._storage_options) if self._storage_options else None

    @property
    def retry_counts(self) -> dict[str, int]:
        """How many attempts this workspace retried so far, by cause: ``conflict`` and ``transient``."""
        with self._lock:
            return dict(self._retry_counts)

    def _after_fork(self) -> None:
        """A forked child must not reuse the parent's connection and handles: start afresh."""
        if self._pid != os.getpid():
            self._init_runtime()

    def _connection(self) -> DBConnection:
        self._after_fork()
        with self._lock:
            if self._db is None:
                import lancedb

                interval = None
                if self._read_consistency_s is not None:
                    interval = dt.timedelta(seconds=self._read_consistency_s)
                self._db = lancedb.connect(
                    self._uri,
                    storage_options=self._storage_options,
                    read_consistency_interval=interval,
                )
            return self._db

    @staticmethod
    def _check_name(name: str) -> None:
        if not isinstance(name, str) or not _TABLE_NAME.match(name):
            raise ValuegateError(
                f"invalid table name {name!r}: use only letters, digits, '_', '-' and '.' "
                "(no '/': name a family of tables with a prefix, e.g. 'valset__<name>')"
            )

    def _retrying(self, what: str, fn: Callable[[], T], table: str | None = None) -> T:
        """Run ``fn`` under the workspace's retry policy (:func:`valuegate.storage.retry.call`: commit
        conflicts and transient object-store errors, counted in :attr:`retry_counts`, one log line per
        retry); between attempts the cached handle of ``table`` moves to the latest version. Errors that
        are not retryable, and the last failure, propagate as raised."""

        def count(kind: str) -> None:
            with self._lock:
                self._retry_counts[kind] += 1

        try:
            return retry.call(fn, what=what, policy=self._retry, on_retry=count,
                              before_retry=(lambda: self._refresh(table)) if table is not None else None)
        except Exception as exc:  # a full device or a damaged table: one line that says so (issue 26)
            where = f"table {table} of {self._uri}" if table else f"{what} in {self._uri}"
            failure = store_failure(exc, where, table, self._uri)
            if failure is None:
                raise
            raise failure from exc

    def _refresh(self, name: str) -> None:
        with self._lock:
            tbl = self._tables.get(name)
        if tbl is None:
            return
        try:
            tbl.checkout_latest()
        except Exception:  # the handle is broken: forget it, the next call reopens the table
            with self._lock:
                self._tables.pop(name, None)

    def _open_fresh(self, name: str) -> LanceTable:
        self._check_name(name)
        try:
            return self._connection().open_table(name)
        except ValueError as exc:
            if "not found" in str(exc).lower():
                raise ValuegateError(
                    f"table {name!r} does not exist in workspace {self._uri}; create it first "
                    "(ingest the data, or Workspace.ensure(name, schema))"
                ) from exc
            raise

    def _table(self, name: str) -> LanceTable:
        self._after_fork()
        with self._lock:
            tbl = self._tables.get(name)
        if tbl is None:
            tbl = self._retrying(f"open {name}", lambda: self._open_fresh(name))
            with self._lock:
                tbl = self._tables.setdefault(name, tbl)
        return tbl

    # ---------------------------------------------------------------- tables

    def table_names(self) -> list[str]:
        """Names of all tables in the workspace, sorted."""

        def op() -> list[str]:
            db = self._connection()
            names: list[str] = []
            token = None
            while True:
                page = db.list_tables(page_token=token)
                names.extend(page.tables)
                token = page.page_token
                if not token:
                    return sorted(names)

        return self._retrying("list tables", op)

    def table_exists(self, name: str) -> bool:
        """Whether table ``name`` exists in the workspace."""
        self._check_name(name)
        with self._lock:
            if name in self._tables:
                return True
        try:
            self._table(name)
        except ValuegateError:
            return False
        return True

    def open(self, name: str) -> LanceTable:
        """A new LanceDB handle of table ``name`` at its latest version (for the raw LanceDB API).

        Raises:
            ValuegateError: the table does not exist.
        """
        return self._retrying(f"open {name}", lambda: self._open_fresh(name))

    def schema(self, name: str) -> pa.Schema:
        """The Arrow schema of table ``name`` (at its latest version)."""
        return self._retrying(f"schema of {name}", lambda: self._table(name).schema, name)

    def ensure(self, name: str, schema: pa.Schema) -> None:
        """Create table ``name`` with ``schema`` if it is missing; otherwise check it has that schema.

        Column names and types must match exactly (order, nullability and metadata are not compared),
        with one migration: when the table lacks only nullable columns of ``schema`` (a table written by
        an older valuegate), they are added, null in every existing row, meaning "not recorded" (one
        metadata commit, logged with the number of rows; see :meth:`add_null_columns`).
        Safe to call from several processes at once.

        Raises:
            ValuegateError: the table exists with a different schema (the message lists the columns).
        """
        self._check_name(name)
        if not self.table_exists(name):

            def create() -> LanceTable:
                return self._connection().create_table(name, schema=schema, exist_ok=True)

            try:
                tbl = self._retrying(f"create {name}", create)
            except ValueError as exc:
                if "schema" not in str(exc).lower():
                    raise
                # created concurrently with another schema: fall through to the check below
            else:
                with self._lock:
                    self._tables.setdefault(name, tbl)
        have = self._table(name).schema
        diffs = _schema_differences(have, schema)
        missing = [f for f in schema if f.name not in have.names]
        if missing and len(diffs) == len(missing) and all(f.nullable for f in missing):
            self.add_null_columns(name, missing)
            diffs = _schema_differences(self._table(name).schema, schema)
        if diffs:
            raise ValuegateError(
                f"table {name!r} in workspace {self._uri} has an incompatible schema: "
                + "; ".join(diffs)
                + ". Use another workspace, or migrate/drop the table."
            )

    def add_null_columns(self, name: str, fields: Sequence[pa.Field]) -> list[str]:
        """Add the nullable columns ``fields`` that table ``name`` lacks, null in every existing row (one
        commit; LanceDB writes no data for them). Concurrent calls add each column once.

        Returns:
            The names of the columns this call added (logged as a warning with the number of rows).
        """
        if any(not f.nullable for f in fields):
            raise ValuegateError(f"table {name!r}: only nullable columns can be added to existing rows")

        def op() -> tuple[list[str], int]:
            tbl = self._table(name)
            tbl.checkout_latest()
            todo = [f for f in fields if f.name not in tbl.schema.names]
            if not todo:
                return [], 0
            rows = tbl.count_rows()
            try:
                tbl.add_columns(list(todo))
            except ValueError as exc:
                if "already exists" not in str(exc):
                    raise
                tbl.checkout_latest()  # another process added it meanwhile
                return [], 0
            return [f.name for f in todo], rows

        added, rows = self._retrying(f"add columns to {name}", op, name)
        if added:
            log.warning(
                "table %s in workspace %s: added column %s (written by an older valuegate); null in its %d "
                "existing rows: not recorded",
                name, self._uri, ", ".join(repr(c) for c in added), rows,
            )
        return added

    def drop(self, name: str) -> None:
        """Delete table ``name`` and all its versions (no-op when it does not exist)."""
        self._check_name(name)
        with self._lock:
            self._tables.pop(name, None)
        if self.table_exists(name):
            with self._lock:
                self._tables.pop(name, None)
            self._retrying(f"drop {name}", lambda: self._connection().drop_table(name))

    @staticmethod
    def _conform(name: str, data: pa.Table, schema: pa.Schema) -> pa.Table:
        """``data`` with exactly the columns of ``schema``, in its order and types."""
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if not isinstance(data, pa.Table):
            raise TypeError(f"expected a pyarrow.Table, got {type(data).__name__}")
        missing = [n for n in schema.names if n not in data.column_names]
        extra = [n for n in data.column_names if n not in schema.names]
        if missing or extra:
            raise ValuegateError(
                f"rows for table {name!r} do not match its schema: "
                + (f"missing columns {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected columns {extra}" if extra else "")
            )
        try:
            return data.select(schema.names).cast(schema)
        except (ValueError, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:  # ArrowInvalid too
            raise ValuegateError(f"rows for table {name!r} cannot be cast to its schema: {exc}") from exc

    # ---------------------------------------------------------------- writes

    def append(self, name: str, data: pa.Table, schema: pa.Schema) -> int:
        """Append rows to table ``name`` (created with ``schema`` if missing) in one commit.

        Commit conflicts and transient object-store errors are retried (see :class:`RetryPolicy`).
        A transient error *after* the commit became visible would make the retry append the rows a
        second time; write through :meth:`upsert` where that must never happen.

        Args:
            name: table name.
            data: the rows; columns must be those of ``schema`` (any order, castable types).
            schema: the table's schema.

        Returns:
            A table version that holds the rows (the current version when ``data`` has no rows). It is
            the commit's own version unless other processes committed at the same moment: then LanceDB
            0.40 may report a later one (seen in about 1 of 20 concurrent appends), so it is not a
            unique id of the commit.
        """
        self.ensure(name, schema)
        rows = self._conform(name, data, schema)
        if rows.num_rows == 0:
            return self.version(name)
        return self._retrying(f"append to {name}", lambda: self._table(name).add(rows).version, name)

    def overwrite(self, name: str, data: pa.Table, schema: pa.Schema) -> int:
        """Replace all rows of table ``name`` (created with ``schema`` if missing) in one commit.

        The history stays: earlier versions and their tags can still be read, which is how a
        validation set keeps every registered version in one table.

        Returns:
            The table version after the commit (with concurrent writers possibly a later one, as for
            :meth:`append`).
        """
        self.ensure(name, schema)
        rows = self._conform(name, data, schema)
        return self._retrying(
            f"overwrite {name}", lambda: self._table(name).add(rows, mode="overwrite").version, name
        )

    def upsert(self, name: str, data: pa.Table, on: str | Sequence[str], *, update: bool = True) -> int:
        """Insert or replace rows of table ``name`` by key ``on`` in one commit (``merge_insert``: when
        matched update all columns, when not matched insert). Idempotent, so retried freely.

        Args:
            name: an existing table.
            data: rows with the table's columns; keys must be unique within ``data`` (LanceDB would
                refuse them with ``update=True`` and insert every copy with ``update=False``).
            on: key column name(s).
            update: replace the rows whose key exists; ``False`` keeps them and only inserts new keys.
                Either way LanceDB commits a new version even when nothing changes.

        Concurrent upserts of the *same* keys from several processes stay duplicate-free only when
        the table has an (unenforced) primary key on ``on``: without one LanceDB 0.40 merges both
        inserts and the key appears twice (lancedb#2463, reproduced here). So the first upsert into a
        table without a primary key sets it to ``on`` (one metadata commit) when ``on`` is a single
        non-nullable string/integer/binary column; LanceDB supports no composite primary key, so with
        several key columns (or a nullable one) give each process disjoint keys.

        Returns:
            The table version after the commit (the current version when ``data`` has no rows).
        """
        keys = [on] if isinstance(on, str) else list(on)
        schema = self.schema(name)
        unknown = [k for k in keys if k not in schema.names]
        if not keys or unknown:
            raise ValuegateError(f"upsert into {name!r}: key columns {unknown or keys} are not in the table")
        if not primary_key(schema) and _can_be_primary_key(schema, keys):
            self._set_primary_key(name, keys[0])
        rows = self._conform(name, data, schema)
        if rows.num_rows == 0:
            return self.version(name)
        counts = rows.group_by(keys).aggregate([([], "count_all")])
        if counts.num_rows != rows.num_rows:
            raise ValuegateError(
                f"upsert into {name!r}: {rows.num_rows - counts.num_rows} duplicate key(s) on {keys} "
                "in the new rows; deduplicate them first"
            )

        def op() -> int:
            tbl = self._table(name)
            builder = tbl.merge_insert(keys if len(keys) > 1 else keys[0])
            if update:
                builder = builder.when_matched_update_all()
            return builder.when_not_matched_insert_all().execute(rows).version

        return self._retrying(f"upsert into {name}", op, name)

    def _set_primary_key(self, name: str, column: str) -> None:
        def op() -> None:
            tbl = self._table(name)
            tbl.checkout_latest()
            if primary_key(tbl.schema):  # another process set it meanwhile
                return
            try:
                tbl.set_unenforced_primary_key(column)
            except ValueError as exc:
                # lost the race against another process setting it: a key is set, which is what counts
                # (LanceDB words it "already set" or "reserved key and cannot be changed once set")
                if "already set" not in str(exc) and "cannot be changed once set" not in str(exc):
                    raise
                tbl.checkout_latest()
            else:
                log.info("table %s: unenforced primary key set to %r", name, column)

        self._retrying(f"set primary key of {name}", op, name)
        have = primary_key(self._table(name).schema)
        if have != [column]:
            log.warning(
                "table %s has primary key %s, not %r: concurrent upserts on %r may duplicate keys",
                name,
                have,
                column,
                column,
            )

    def delete(self, name: str, where: str) -> int:
        """Delete the rows of table ``name`` matching the SQL predicate ``where``.

        Returns:
            The table version after the commit.
        """
        if not where or not where.strip():
            raise ValuegateError(f"delete from {name!r}: give a predicate (use 'TRUE' to delete every row)")
        return self._retrying(f"delete from {name}", lambda: self._table(name).delete(where).version, name)

    # ---------------------------------------------------------------- reads

    def _at_version(self, name: str, version: int | str) -> LanceTable:
        tbl = self._open_fresh(name)
        try:
            tbl.checkout(version)
        except (RuntimeError, ValueError) as exc:
            if classify_error(exc) is not None:
                raise
            raise ValuegateError(
                f"table {name!r} has no version or tag {version!r} "
                f"(versions: {self._version_range(tbl)}; tags: {sorted(tbl.tags.list())})"
            ) from exc
        return tbl

    @staticmethod
    def _version_range(tbl: LanceTable) -> str:
        vs = [v["version"] for v in tbl.list_versions()]
        return f"{min(vs)}..{max(vs)}" if vs else "none"

    def read(
        self,
        name: str,
        where: str | None = None,
        columns: list[str] | None = None,
        version: int | str | None = None,
    ) -> pa.Table:
        """Rows of table ``name``.

        Args:
            name: table name.
            where: SQL predicate (build literals with :func:`sql_str` / :func:`sql_in`); all rows if None.
            columns: columns to return, in this order; all if None.
            version: a version number or a tag name to read instead of the latest version.

        Returns:
            The rows, in storage order (no order is guaranteed across versions or after upserts).
        """

        def op() -> pa.Table:
            tbl = self._table(name) if version is None else self._at_version(name, version)
            if where is None and columns is None:
                return tbl.to_arrow()
            q = tbl.search()
            if where is not None:
                q = q.where(where)
            if columns is not None:
                q = q.select(list(columns))
            return q.to_arrow()

        return self._retrying(f"read {name}", op, name)

    def _key_map(self, name: str, column: str, tbl: LanceTable) -> tuple[int, np.ndarray, np.ndarray]:
        """``(version, sorted keys as bytes, their row offsets)`` of ``tbl`` at its current version,
        from one scan of the key column, cached per table version."""
        version = int(tbl.version)
        with self._lock:
            cached = self._key_maps.get((name, column))
        if cached is not None and cached[0] == version:
            return cached
        col = tbl.search().select([column]).to_arrow().column(column)
        keys = _key_bytes(col)
        order = np.argsort(keys, kind="stable")
        entry = (version, keys[order], order.astype(np.int64))
        with self._lock:
            self._key_maps.pop((name, column), None)
            self._key_maps[(name, column)] = entry
            while len(self._key_maps) > _KEY_MAPS_KEPT:  # the least recently built goes first
                self._key_maps.pop(next(iter(self._key_maps)))
        return entry

    def read_by_key(self, name: str, column: str, values: Sequence[str],
                    columns: list[str] | None = None) -> pa.Table:
        """The rows of table ``name`` whose ``column`` (a unique string key, e.g. ``id``) is in ``values``.

        Linear in the table, not in ``len(values)`` × the table: the key column is scanned once per
        table version (cached for the last few tables: about 70 bytes per row for sha256 hex ids) and
        the matching rows are fetched by row offset (``take_offsets``), instead of one ``IN (...)``
        query per chunk of keys, each scanning the key column of the whole table (docs/benchmarks.md,
        "Storage at scale": 3.3× faster than that at 1M rows).

        Args:
            name: table name.
            column: the key column (string; one row per key).
            values: keys to fetch; duplicates are fetched once, keys without a row are left out.
            columns: columns to return, in this order; all if None.

        Returns:
            The rows, in storage order (reordering them to ``values`` would cost more than the read:
            pyarrow's ``take`` of long list columns; align on the key column).
        """
        wanted = list(dict.fromkeys(values))
        out_cols = list(columns) if columns is not None else None

        def op() -> pa.Table:
            tbl = self._table(name)
            cols = out_cols if out_cols is not None else tbl.schema.names
            fetch = cols if column in cols else [*cols, column]
            for _ in range(3):  # a commit between the key scan and the take: the check below sees it
                version, keys, offsets = self._key_map(name, column, tbl)
                q = _key_bytes(pa.array(wanted, type=pa.string()))
                pos = np.minimum(np.searchsorted(keys, q), max(keys.size - 1, 0))
                found = keys[pos] == q if keys.size else np.zeros(q.size, dtype=bool)
                rows = offsets[pos[found]]
                by_offset = np.argsort(rows, kind="stable")
                got = tbl.take_offsets(rows[by_offset].tolist()).select(fetch).to_arrow() if rows.size \
                    else tbl.search().where("FALSE").select(fetch).to_arrow()
                if _key_bytes(got.column(column)).tolist() == q[found][by_offset].tolist():
                    return got.select(cols)
                with self._lock:  # the table moved on meanwhile: scan the keys again
                    self._key_maps.pop((name, column), None)
                log.info("read_by_key %s: version %d changed during the read; reading again", name, version)
            raise ValuegateError(f"reading {len(wanted)} rows of {name!r} by {column!r}: the table kept "
                                 "changing between the key scan and the read (3 tries)")

        return self._retrying(f"read {name} by {column}", op, name)

    def count(self, name: str, where: str | None = None) -> int:
        """Number of rows of table ``name`` (matching the SQL predicate ``where`` if given)."""
        return self._retrying(f"count {name}", lambda: self._table(name).count_rows(where), name)

    # ---------------------------------------------------------------- versions and tags

    def version(self, name: str) -> int:
        """The latest version number of table ``name`` (1 right after creation, +1 per commit)."""
        return self._retrying(f"version of {name}", lambda: self._table(name).version, name)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """All versions of table ``name``, oldest first: ``[{"version": int, "timestamp": datetime}]``
        with timezone-aware UTC timestamps (LanceDB gives naive local time; converted here)."""

        def op() -> list[dict[str, Any]]:
            out = []
            for v in self._table(name).list_versions():
                ts = v["timestamp"]
                if isinstance(ts, dt.datetime):
                    ts = ts.astimezone(dt.timezone.utc)
                out.append({"version": int(v["version"]), "timestamp": ts})
            return sorted(out, key=lambda v: v["version"])

        return self._retrying(f"versions of {name}", op, name)

    def tag(self, name: str, tag: str, version: int | None = None) -> int:
        """Name a version of table ``name``; a tagged version survives cleanup and can be read by tag.

        Tags are immutable: tagging again with the version the tag already has is a no-op, with
        another version an error (``delete_tag`` first).

        Args:
            name: table name.
            tag: tag name.
            version: the version to tag; the latest when None.

        Returns:
            The tagged version.
        """
        tbl = self._table(name)
        target = int(version) if version is not None else self.version(name)
        existing = self.tags(name)
        if tag in existing:
            if existing[tag] == target:
                return target
            raise ValuegateError(
                f"tag {tag!r} of table {name!r} already points at version {existing[tag]}, not {target}; "
                "delete the tag first to move it"
            )

        def op() -> int:
            try:
                tbl.tags.create(tag, target)
            except RuntimeError as exc:
                msg = str(exc).lower()
                if "already exists" in msg and self.tags(name).get(tag) == target:
                    return target  # an earlier attempt did create it
                if "not found" in msg or "does not exist" in msg or "already exists" in msg:
                    raise ValuegateError(
                        f"cannot tag version {target} of table {name!r} as {tag!r}: {exc}"
                    ) from exc
                raise
            return target

        return self._retrying(f"tag {name}@{tag}", op, name)

    def tags(self, name: str) -> dict[str, int]:
        """Tags of table ``name``: tag name → version."""
        return self._retrying(
            f"tags of {name}",
            lambda: {t: int(info["version"]) for t, info in self._table(name).tags.list().items()},
            name,
        )

    def delete_tag(self, name: str, tag: str) -> None:
        """Remove tag ``tag`` from table ``name`` (the version itself stays)."""
        if tag not in self.tags(name):
            raise ValuegateError(f"table {name!r} has no tag {tag!r} (tags: {sorted(self.tags(name))})")
        self._retrying(f"delete tag {name}@{tag}", lambda: self._table(name).tags.delete(tag), name)

    def scan(self, name: str, version: int | str | None = None, batch_rows: int = 8192) -> int:
        """Read every column of every row of table ``name`` (at ``version``, a number or a tag, else the
        latest), ``batch_rows`` at a time, and return the rows read: what ``valuegate verify`` does to find
        a truncated, zeroed or missing data file (:class:`~valuegate.errors.DamagedTable`).

        Raises:
            DamagedTable: a file of the table cannot be read, or fewer rows come back than the table counts.
        """

        def op() -> int:
            tbl = self._table(name) if version is None else self._at_version(name, version)
            expected = tbl.count_rows()
            got = sum(batch.num_rows for batch in tbl.search().to_batches(batch_rows))
            if got != expected:
                raise DamagedTable(f"table {name} is damaged: {got} rows read, {expected} counted; run "
                                   f"`valuegate verify --workspace {self._uri}`")
            return got

        return self._retrying(f"scan {name}", op, name)
