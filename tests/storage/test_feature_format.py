"""Feature formats 5 to 7 (issue 19): the sparse rows are stored in int8 steps with a float32 scale per
support entry (format 6; float16 in format 5), the mean hidden state in float16 (format 7) and a sample can
carry the count sketch of its stored rows;
what is read back is consistent with itself (self-influence, sketch) and within half a step of the float32
rows the engine computes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from tiny import random_rows, write_jsonl

from valuegate.engine.aggregate import block_inner_products
from valuegate.engine.extraction import extract_sparse_samples
from valuegate.engine.model import load_model
from valuegate.engine.sketch import count_sketch
from valuegate.inputs.rows import read_samples
from valuegate.settings import load_settings
from valuegate.storage import features as fstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace
from valuegate.storage.samples import ensure_sample_tables
from valuegate.tasks.extract import extract_dataset
from valuegate.tasks.ingest import ingest_file

SKETCH_DIM = 2048  # wide, so the sketch's estimate of the rows' inner products is close on 10 samples


def _settings(model_dir, uri: str, **extract):
    return load_settings(overrides={"model": {"name": str(model_dir), "device": "cpu"}, "workspace": uri,
                                    "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8, **extract}})


@pytest.fixture
def stored(tmp_path, tiny_model_dir):
    """10 tiny-model samples extracted into a workspace; their stored rows and their float32 features."""
    ws = Workspace(str(tmp_path / "ws"))
    ensure_sample_tables(ws)
    path = write_jsonl(tmp_path / "t.jsonl", random_rows(10, seed=51))
    ingest_file(ws, "d", path, 10_000)
    settings = _settings(tiny_model_dir(), ws.uri, sketch_dim=SKETCH_DIM)
    rep = extract_dataset(ws, "d", settings, progress=False)
    assert rep.extracted == 10
    t = fstore.read_features(ws, rep.model_fp)
    lm = load_model(settings.model, progress=False)
    samples = read_samples(path)[1]
    f32 = extract_sparse_samples(lm, samples, settings.extract, progress=False)
    return t, f32, settings, lm, ws, rep.model_fp


def _by_support(t: pa.Table, f32) -> list[int]:
    """Row positions of ``t`` in the order of ``f32`` (matched on the support, distinct here)."""
    pos = {tuple(tok): i for i, tok in enumerate(t["token_ids"].to_pylist())}
    assert len(pos) == t.num_rows
    return [pos[tuple(f.token_ids.tolist())] for f in f32]


def test_rows_are_stored_in_int8_steps_within_their_precision(stored):
    t, f32, _, lm, ws, fp = stored
    raw = ws.read(schemas.features_table(fp))  # as stored, not through the store's readers
    assert raw.schema.field("rows").type == pa.binary()  # format 7: the int8 steps' bytes
    assert raw.schema.field("hard_rows").type == pa.binary()
    assert raw.schema.field("rows_scale").type == pa.list_(pa.float32())
    assert t.schema.field("rows").type == pa.list_(pa.float32())  # the readers give float32 rows
    assert t.schema.field("hard_rows").type == pa.list_(pa.float32())
    width = lm.hidden_size
    order = _by_support(t, f32)
    # format 7: the mean hidden state in float16, the float32 mean within float16's rounding
    assert raw.schema.field("mean_hidden").type == pa.list_(pa.float16(), lm.hidden_size)
    for f, i in zip(f32, order, strict=True):
        got = np.asarray(t["mean_hidden"][i].values.to_numpy(zero_copy_only=False))
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), f.mean_hidden, rtol=2**-10, atol=1e-6)
    raw_pos = {i: p for p, i in enumerate(raw["id"].to_pylist())}
    for f, i in zip(f32, order, strict=True):
        got = np.asarray(t["rows"][i].values.to_numpy(zero_copy_only=False)).reshape(-1, width)
        p = raw_pos[t["id"][i].as_py()]
        q = np.frombuffer(raw["rows"][p].as_py(), dtype=np.int8).reshape(-1, width)
        scale = np.asarray(raw["rows_scale"][p].values.to_numpy(zero_copy_only=False))
        assert q.dtype == np.int8 and np.abs(q).max() <= 127 and scale.shape == (got.shape[0],)
        np.testing.assert_array_equal(got, q.astype(np.float32) * scale[:, None])  # read = q · scale
        want = f.rows
        # half a step per entry (a step: its block's largest |value| / 127); 1e-6: batch-order noise
        assert np.all(np.abs(got - want) <= scale[:, None] / 2 * (1 + 1e-5) + 1e-6 * np.abs(want).max())
        assert not np.array_equal(got, want)  # really rounded
        # the self-influence is that of the stored rows, in float64
        assert t["self_influence"][i].as_py() == pytest.approx(np.square(got, dtype=np.float64).sum(), rel=1e-12)
        assert t["self_influence"][i].as_py() == pytest.approx(f.self_influence, rel=1e-2)
    # the readers give float32 rows: the CSR parts are float32, the streaming scan's product equals the CSR one
    width = lm.hidden_size
    indptr, indices, data = fstore.sparse_arrays(t, width)
    assert data.dtype == np.float32
    m = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(t.num_rows, lm.vocab_size * width))
    vec = np.asarray(m.mean(0)).reshape(-1)
    want = dict(zip(t["id"].to_pylist(), m @ vec, strict=True))
    for steps in (False, True):  # float32 rows, and the int8 steps with their scales (the scan's path)
        ids, got = [], []
        for batch in fstore.iter_features(ws, fp, ["id", "token_ids", "rows"], batch_rows=4, steps=steps):
            tok = batch.column(1)
            ids += batch.column(0).to_pylist()
            if steps:
                rows = fstore.row_steps(batch.column("rows"))[1]
                assert rows.dtype == np.int8
                scales = batch.column("rows_scale").flatten().to_numpy(zero_copy_only=False)
            else:
                rows, scales = batch.column("rows").flatten().to_numpy(zero_copy_only=False), None
            got += list(block_inner_products(tok.flatten().to_numpy(zero_copy_only=False), rows,
                                             np.diff(tok.offsets.to_numpy()), vec, scales))
        np.testing.assert_allclose(got, [want[i] for i in ids], rtol=1e-9)


def test_the_sketch_is_the_count_sketch_of_the_stored_rows(stored):
    t, _, settings, lm, _, _ = stored
    width = lm.hidden_size
    assert t.schema.field("sketch").type == pa.list_(pa.float16(), SKETCH_DIM)
    sk = np.asarray(t["sketch"].combine_chunks().values.to_numpy(zero_copy_only=False)).reshape(t.num_rows, -1)
    assert sk.shape == (10, SKETCH_DIM) and sk.dtype == np.float16
    indptr, indices, data = fstore.sparse_arrays(t, width)
    m = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(t.num_rows, lm.vocab_size * width))
    # what a reader without the column computes (same columns token·width + j, seed extract.seed)
    mine = count_sketch(m, SKETCH_DIM, seed=settings.extract.seed)
    np.testing.assert_array_equal(sk, mine.astype(np.float16))
    # its inner products estimate the rows' (an unbiased estimate; close at this width)
    exact = (m @ m.T).toarray()
    est = sk.astype(np.float64) @ sk.astype(np.float64).T
    assert np.abs(est - exact).max() < 0.1 * np.abs(exact).max()
    off = ~np.eye(10, dtype=bool)
    assert np.corrcoef(est[off], exact[off])[0, 1] > 0.95


def test_no_sketch_column_with_sketch_dim_0(tmp_path, tiny_model_dir):
    ws = Workspace(str(tmp_path / "ws"))
    ensure_sample_tables(ws)
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(3, seed=52)), 10_000)
    rep = extract_dataset(ws, "d", _settings(tiny_model_dir(), ws.uri, sketch_dim=0), progress=False)
    assert rep.extracted == 3
    assert "sketch" not in ws.schema(schemas.features_table(rep.model_fp)).names


def test_the_writer_rounds_float_rows_to_int8_steps_of_any_magnitude_and_refuses_a_float16_sketch_overflow(
        tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    fp = "a" * 64

    def row(i: str, rows: np.ndarray, **more) -> dict:
        return {"id": i, "token_ids": np.array([1, 4], np.int32), "rows": rows, "n_tokens": 2,
                "mean_loss": 1.0, "dropped_mass": 0.0, "self_influence": 1.0,
                "mean_hidden": np.zeros(4, np.float32), "pooled_error": np.zeros(1, np.float32),
                "error_sum": np.zeros(2, np.float32), "batch": 0, "seconds": 0.0, **more}

    # two blocks of width 2: steps 1/127 and 3.5e4/127; no float16 limit any more (1e30 is stored too)
    fstore.write_features(ws, fp, [row("a", np.array([1.0, 1 / 3, -2.5e-3, 3.5e4], np.float32)),
                                   row("big", np.array([1e30, -1e29, 0, 0], np.float32))], 4, 1)
    got = {r["id"]: np.asarray(r["rows"], np.float32) for r in fstore.read_features(ws, fp).to_pylist()}
    np.testing.assert_allclose(got["a"], [1.0, 42 / 127, 0.0, 3.5e4], rtol=1e-6)
    np.testing.assert_allclose(got["big"], [1e30, -13 / 127 * 1e30, 0, 0], rtol=1e-6)
    fstore.ensure_feature_set(ws, "b" * 64, {}, 4, 8, 2, 1, sketch_dim=2)
    with pytest.raises(ValueError, match=r"feature row 'b': its sketch holds a value beyond the range of "
                                         r"float16 \(7e\+04\)"):
        fstore.write_features(ws, "b" * 64, [row("b", np.ones(4, np.float32), sketch=np.array([1.0, 7e4]))], 4, 1,
                              sketch_dim=2)
    assert fstore.feature_ids(ws, "b" * 64) == set()  # nothing of the refused batch was written
    with pytest.raises(ValueError, match=r"feature row 'h': its mean_hidden holds a value beyond the range of "
                                         r"float16 \(9e\+04\)"):
        fstore.write_features(ws, fp, [row("h", np.ones(4, np.float32), mean_hidden=np.array([0, 9e4, 0, 1.0]))],
                              4, 1)
    assert "h" not in fstore.feature_ids(ws, fp)
    # int8 steps are only meaningful with their scales: one line naming the row, not Arrow's null error
    with pytest.raises(ValueError, match=r"^feature row 'q': its rows are int8 steps without rows_scale"):
        fstore.write_features(ws, fp, [row("q", np.ones(4, np.int8))], 4, 1)
    assert "q" not in fstore.feature_ids(ws, fp)


def test_row_steps_of_binary_and_list_columns_sliced_empty_and_null():
    """The int8 steps of a stored row column: format 7's ``binary``, format 6's ``list<int8>``; a slice
    starts at its own first row, a null row holds no steps, an empty column has one offset."""
    b = pa.array([b"\x01\x02", None, b"\xff", b""], type=pa.binary())
    off, q = fstore.row_steps(b)
    assert off.tolist() == [0, 2, 2, 3, 3] and q.tolist() == [1, 2, -1]
    off, q = fstore.row_steps(b.slice(2))
    assert off.tolist() == [0, 1, 1] and q.tolist() == [-1]
    off, q = fstore.row_steps(pa.chunked_array([b.slice(0, 1), b.slice(2, 1)]))
    assert off.tolist() == [0, 2, 3] and q.tolist() == [1, 2, -1]
    off, q = fstore.row_steps(pa.array([[1, 2], None, [-3]], type=pa.list_(pa.int8())))
    assert off.tolist() == [0, 2, 2, 3] and q.tolist() == [1, 2, -3]
    off, q = fstore.row_steps(pa.array([], type=pa.binary()))
    assert off.tolist() == [0] and q.size == 0 and q.dtype == np.int8
    # read back as float32 rows, nulls kept: [1, 2] · 0.5 and [-1, 3] · 2 (one block of width 2 each)
    rows = pa.array([b"\x01\x02", None, b"\xff\x03"], type=pa.binary())
    got = fstore.dequantized(pa.table({"rows": rows, "rows_scale": pa.array([[0.5], None, [2.0]],
                                                                             type=pa.list_(pa.float32()))}))
    assert got["rows"].to_pylist() == [[0.5, 1.0], None, [-2.0, 6.0]]
