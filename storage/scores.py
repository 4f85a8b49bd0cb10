"""The workspace's ``scores`` table: one row per (scores run, sample), written only here.

A scores run (``run_id``) holds one row per training sample it valued (:data:`~valuegate.storage.schemas.scores_schema`).
Rows are inserted only if absent on ``(run_id, id)``, so a retried write (a retried task or shard) never
duplicates one; the step that computes them is ``tasks/score.py``.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa

from valuegate.engine.columns import sample_score_columns
from valuegate.errors import ValuegateError
from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace, sql_str
from valuegate.storage.metadata import metadata_frame

__all__ = ["count_run", "empty_scores", "read_score_run", "run_ids", "scores_table", "write_scores"]


def scores_table(rows: dict[str, Any]) -> pa.Table:
    """Rows of a scores run as a table of :data:`~valuegate.storage.schemas.scores_schema` (``rows``: column
    name → n values, every column of the schema)."""
    return pa.Table.from_pydict(rows, schema=schemas.current_scores_schema())


def empty_scores() -> pa.Table:
    """A scores table with no row."""
    return schemas.scores_schema.empty_table()


def write_scores(ws: Workspace, table: pa.Table) -> int:
    """Write rows of a scores run, each only if the run holds no row of its id yet: an insert-if-absent on
    ``(run_id, id)`` in one commit (``merge_insert``), so a write repeated after a commit that did land (an
    inner retry after a transient error, a retried Prefect task or shard) leaves each row once, as first
    committed. The one write of the local and the sharded paths.

    Args:
        table: rows in :data:`~valuegate.storage.schemas.scores_schema`, distinct ``(run_id, id)``.

    Returns:
        The scores table's version after the commit.
    """
    ws.ensure(schemas.SCORES, schemas.current_scores_schema())  # also gives an older table its new columns
    return ws.upsert(schemas.SCORES, table, ["run_id", "id"], update=False)


def _run_where(run_id: str) -> str:
    return f"run_id = {sql_str(run_id)}"


def run_ids(ws: Workspace, run_id: str) -> set[str]:
    """The sample ids scores run ``run_id`` already holds (empty: no scores table yet)."""
    if not ws.table_exists(schemas.SCORES):
        return set()
    return set(ws.read(schemas.SCORES, where=_run_where(run_id), columns=["id"]).column("id").to_pylist())


def count_run(ws: Workspace, run_id: str, truncated: bool = False) -> int:
    """Rows of scores run ``run_id`` (``truncated``: only those valued on their first ``max_length`` tokens)."""
    where = _run_where(run_id)
    return ws.count(schemas.SCORES, where=f"{where} AND truncated" if truncated else where)


def read_score_run(ws: Workspace, run_id: str, dataset: str) -> pl.DataFrame:
    """One scoring run joined with its samples' content and their rows' metadata columns.

    Returns:
        one row per scored sample: ``id``, the content columns (``kind``, ``prompt``, ``response``,
        ``messages``, ``text``), the metadata columns of the sample's source rows (their union: per column
        the first non-null value in (source, row) order; ``source``, ``row``: the first row), ``value``,
        ``nearest_ids``, ``n_tokens``, ``mean_loss``, ``self_influence``, ``valset``, ``model_fp``.
    """
    if ws.table_exists(schemas.SCORES):  # a table of an older valuegate gains its new columns (null)
        ws.ensure(schemas.SCORES, schemas.current_scores_schema())
    scores = pl.from_arrow(ws.read(schemas.SCORES, where=_run_where(run_id)))
    if scores.height == 0:
        raise ValuegateError(f"no scores for run {run_id!r}")
    ids = scores["id"].to_list()
    content = pl.from_arrow(sstore.read_samples_by_id(ws, ids)).select(
        "id", "kind", "prompt", "response", "messages", "text")
    members = pl.from_arrow(sstore.read_members(ws, dataset, columns=["id", "source", "row", "metadata"]))
    members = members.sort("source", "row")
    first = members.unique("id", keep="first", maintain_order=True).select("id", "source", "row")
    # the union of the extra columns of every row of a sample (one sample in a JSONL and in a Parquet with
    # other, typed columns keeps them all, issue 26): per column, the first row's value that is not null
    meta = metadata_frame(members["metadata"].to_list())  # typed columns (bytes, timestamps...) with their types
    if meta is not None:
        reserved = set(content.columns) | set(scores.columns) | {"source", "row"}
        meta = meta.rename({c: f"meta_{c}" for c in meta.columns if c in reserved})
        merged = pl.concat([members.select("id"), meta], how="horizontal").group_by("id", maintain_order=True).agg(
            pl.all().drop_nulls().first())
        first = first.join(merged, on="id", how="left")
    keep = ["id", "value", "nearest_ids", "nearest_values", *sample_score_columns(), "valset", "model_fp"]
    return content.join(first, on="id", how="left").join(scores.select(keep), on="id", how="inner")
