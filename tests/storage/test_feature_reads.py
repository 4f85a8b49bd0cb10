"""Feature-store reads at scale (issue 19), on small real LanceDB tables: reads by id (one key scan per
table version, then a take by offset) return the rows the old ``id IN (...)`` queries did; vector
search uses the metric the docs promise (dot) with and without the index; the streaming ``mean``
equals the CSR one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from valuegate.engine.forvalue import sparse_mean_csr
from valuegate.storage import features as fstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace, sql_in

FP = "e" * 64
HIDDEN, WIDTH, VOCAB = 8, 2, 12


@pytest.fixture
def ws(tmp_path):
    return Workspace(str(tmp_path / "ws"))


def _rows(rng: np.random.Generator, start: int, n: int) -> list[dict]:
    """Feature rows with random supports (some empty), rows and pooled vectors of varying norms."""
    out = []
    for i in range(start, start + n):
        sup = np.sort(rng.choice(VOCAB, size=int(rng.integers(0, 5)), replace=False)).astype(np.int32)
        out.append({"id": f"s{i:04d}", "truncated": bool(i % 7 == 0), "token_ids": sup,
                    "rows": rng.normal(size=sup.size * WIDTH).astype(np.float32), "n_tokens": 3,
                    "mean_loss": 1.0, "dropped_mass": 0.0, "self_influence": 1.0,
                    "mean_hidden": (rng.normal(size=HIDDEN) * rng.uniform(0.1, 10)).astype(np.float32),
                    "pooled_error": np.zeros(1, np.float32), "error_sum": np.zeros(sup.size, np.float32),
                    "batch": 0, "seconds": 0.0})
    return out


def _table(ws: Workspace, rng: np.random.Generator, n: int) -> str:
    fstore.ensure_feature_set(ws, FP, {"x": 1}, hidden_size=HIDDEN, vocab_size=VOCAB, row_width=WIDTH, error_dim=1)
    for lo in range(0, n, 100):  # several fragments
        fstore.write_features(ws, FP, _rows(rng, lo, min(100, n - lo)), HIDDEN, 1)
    return schemas.features_table(FP)


def _old_read(ws: Workspace, table: str, ids: list[str], columns: list[str]) -> pa.Table:
    """``read_features(ids=...)`` before issue 19: one ``IN`` query per 2,000 ids."""
    return pa.concat_tables([ws.read(table, where=sql_in("id", ids[i:i + 2000]), columns=columns)
                             for i in range(0, len(ids), 2000)])


def test_reads_by_id_return_the_rows_of_the_in_query(ws):
    rng = np.random.default_rng(0)
    table = _table(ws, rng, 250)
    ws.delete(table, "id IN ('s0003', 's0150')")  # deletions shift the offsets of later rows
    cols = ["id", "token_ids", "rows", "mean_hidden", "truncated"]
    ids = [f"s{i:04d}" for i in rng.permutation(250)] + ["nope", "s0007"]  # a missing id, a repeat
    got = fstore.read_features(ws, FP, ids, cols)
    expected_ids = [i for i in dict.fromkeys(ids) if i not in ("nope", "s0003", "s0150")]
    assert sorted(got["id"].to_pylist()) == sorted(expected_ids)  # each once; no order promised
    assert got.column_names == cols
    old = fstore.dequantized(_old_read(ws, table, ids, fstore.with_scales(cols)), cols)  # int8 rows as float32
    assert got.schema.field("rows").type == pa.list_(pa.float32())
    assert got.sort_by("id").equals(old.sort_by("id"))

    # a new version (an append after the key scan was cached) is seen
    fstore.write_features(ws, FP, _rows(rng, 900, 3), HIDDEN, 1)
    got = fstore.read_features(ws, FP, ["s0902", "s0001", "s0900"], ["id", "n_tokens"])
    assert sorted(got["id"].to_pylist()) == ["s0001", "s0900", "s0902"]
    assert fstore.read_features(ws, FP, [], ["id"]).num_rows == 0
    assert fstore.read_features(ws, FP, ["nope"], ["id"]).num_rows == 0
    # truncated_ids goes the same way
    asked = [f"s{i:04d}" for i in range(30)]
    assert fstore.truncated_ids(ws, FP, asked) == [i for i in asked if int(i[1:]) % 7 == 0]


def test_read_by_key_sees_a_write_of_another_workspace_handle(ws):
    rng = np.random.default_rng(1)
    table = _table(ws, rng, 20)
    assert ws.read_by_key(table, "id", ["s0005"], ["id"])["id"].to_pylist() == ["s0005"]
    other = Workspace(ws.uri)  # another process, in effect
    other.delete(table, "id < 's0010'")
    fstore.write_features(other, FP, _rows(rng, 500, 2), HIDDEN, 1)
    got = ws.read_by_key(table, "id", ["s0005", "s0501", "s0012"], ["id"])
    assert sorted(got["id"].to_pylist()) == ["s0012", "s0501"]


def test_a_streaming_scan_yields_every_row_once_and_its_product_is_the_csr_mean(ws):
    from valuegate.engine.aggregate import block_inner_products

    rng = np.random.default_rng(4)
    _table(ws, rng, 230)
    valid = sp.random(6, VOCAB * WIDTH, density=0.5, format="csr", random_state=5, dtype=np.float32)
    v = np.asarray(valid.astype(np.float64).mean(axis=0)).reshape(-1)
    ids, parts = [], []
    for batch in fstore.iter_features(ws, FP, ["id", "token_ids", "rows"], batch_rows=64, steps=True):
        assert batch.num_rows <= 64  # several batches
        tok = batch.column(1)
        ids += batch.column(0).to_pylist()
        parts.append(block_inner_products(tok.flatten().to_numpy(zero_copy_only=False),
                                          fstore.row_steps(batch.column("rows"))[1],
                                          np.diff(tok.offsets.to_numpy()), v,
                                          batch.column("rows_scale").flatten().to_numpy(zero_copy_only=False)))
    values = np.concatenate(parts)
    t = fstore.read_features(ws, FP, ids, ["id", "token_ids", "rows"])
    assert t["id"].to_pylist() == ids  # both in storage order
    indptr, indices, data = fstore.sparse_arrays(t, WIDTH)
    train = sp.csr_matrix((data, indices, indptr), shape=(len(ids), VOCAB * WIDTH))
    assert sorted(ids) == [f"s{i:04d}" for i in range(230)]
    np.testing.assert_allclose(values, sparse_mean_csr(train, valid), rtol=1e-5, atol=1e-6)
