"""What the steps need from a workspace's tables: the :class:`Store` interface, and :func:`open_store`, the one
place that picks its implementation.

:class:`valuegate.storage.lance.Workspace` (LanceDB, on local disk or an S3-compatible store) is the only
implementation. A table is named (``samples``, ``features__<model fp>``, ...; :mod:`valuegate.storage.schemas`
gives every schema), holds Arrow rows, has numbered versions (every write commits one) and named tags, and is
filtered by a SQL predicate (``where``: DataFusion's dialect; quote values with
:func:`valuegate.storage.lance.sql_str` and :func:`~valuegate.storage.lance.sql_in`). Every write is atomic:
a reader sees a version whole or not at all. Errors: a missing table or tag and a schema the table cannot take
are a :class:`~valuegate.errors.ValuegateError`; a full device, a damaged file and a store that stopped
answering are :class:`~valuegate.errors.NoSpace`, :class:`~valuegate.errors.DamagedTable` and
:class:`~valuegate.errors.StoreUnreachable` (:mod:`valuegate.storage.failures`).

A second backend implements these methods and is returned by :func:`open_store` for its URIs; the table
modules of ``storage/`` (samples, valsets, scores, features, images, versions, verify) and the steps of
``tasks/`` then run on it unchanged, but for :func:`valuegate.storage.features` streaming reads, which still
open the LanceDB table (``Workspace.open``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Store", "open_store"]


@runtime_checkable
class Store(Protocol):
    """The tables of a workspace, as the steps and the table modules of ``storage/`` use them."""

    @property
    def uri(self) -> str:
        """The workspace's location (an absolute directory, or ``s3://bucket/prefix``)."""
        ...

    @property
    def storage_options(self) -> dict[str, str] | None:
        """The object store's options (endpoint, credentials, region), or None (local disk)."""
        ...

    # ---- tables
    def table_names(self) -> list[str]:
        """Every table of the workspace."""
        ...

    def table_exists(self, name: str) -> bool: ...

    def schema(self, name: str) -> pa.Schema: ...

    def ensure(self, name: str, schema: pa.Schema) -> None:
        """Create ``name`` with ``schema`` unless it exists (then its columns must hold ``schema``'s; missing
        nullable ones are added as nulls)."""
        ...

    def drop(self, name: str) -> None:
        """Remove the table and its versions (``valuegate verify``'s repair of a derived table)."""
        ...

    # ---- writes: each commits one version, atomically
    def append(self, name: str, data: pa.Table, schema: pa.Schema) -> int:
        """Add rows; the new version."""
        ...

    def overwrite(self, name: str, data: pa.Table, schema: pa.Schema) -> int:
        """Replace every row (older versions stay readable); the new version."""
        ...

    def upsert(self, name: str, data: pa.Table, on: str | Sequence[str], *, update: bool = True) -> int:
        """Insert rows whose key ``on`` is new; with ``update``, replace those whose key exists. Exactly once
        under concurrent writers. The rows inserted or updated."""
        ...

    def delete(self, name: str, where: str) -> int:
        """Delete the rows matching ``where``; how many."""
        ...

    # ---- reads
    def read(self, name: str, where: str | None = None, columns: list[str] | None = None,
             version: int | str | None = None) -> pa.Table:
        """The rows matching ``where`` (all when None), these ``columns``, at ``version`` (a number or a tag;
        the latest when None)."""
        ...

    def read_by_key(self, name: str, column: str, values: Sequence[str],
                    columns: list[str] | None = None) -> pa.Table:
        """The rows whose ``column`` is in ``values`` (a key lookup, for many values)."""
        ...

    def count(self, name: str, where: str | None = None) -> int: ...

    def scan(self, name: str, version: int | str | None = None, batch_rows: int = 8192) -> int:
        """Read every row of every column (a damaged file raises :class:`~valuegate.errors.DamagedTable`); the
        rows read."""
        ...

    # ---- versions and tags
    def version(self, name: str) -> int:
        """The latest version (what a cache key of a step that reads the table holds)."""
        ...

    def tag(self, name: str, tag: str, version: int | None = None) -> int:
        """Name ``version`` (the latest when None) ``tag``; the version tagged."""
        ...

    def tags(self, name: str) -> dict[str, int]: ...

    def delete_tag(self, name: str, tag: str) -> None: ...


def open_store(uri: str | None = None, **kwargs: Any) -> Store:
    """The workspace at ``uri`` (``$VALUEGATE_WORKSPACE``, else ``./valuegate-workspace``, when None): today
    always the LanceDB :class:`~valuegate.storage.lance.Workspace` (local or ``s3://``), configured from the
    environment (:meth:`~valuegate.storage.lance.Workspace.from_env`; ``kwargs`` go to it)."""
    from valuegate.storage.lance import Workspace

    return Workspace.from_env(uri, **kwargs)
