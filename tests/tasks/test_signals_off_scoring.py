"""Stored scoring with the signals off (issue 19): the ``mean`` aggregate by one streaming scan of the
feature table equals the chunked reads by id; the ``nearest`` aggregate by sketch candidates equals the
exhaustive one when every validation sample is a candidate."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import random_rows, write_jsonl

from valuegate.settings import load_settings
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace
from valuegate.tasks import score as score_mod
from valuegate.tasks.extract import extract_for_run
from valuegate.tasks.ingest import ingest_file
from valuegate.tasks.score import score_dataset
from valuegate.tasks.validation_set import register_valset

COLUMNS = ("n_tokens", "truncated", "mean_loss", "self_influence", "rds_mean", "perplexity", "ifd", "nearest_ids")


@pytest.fixture
def ws(tmp_path, tiny_model_dir):
    """A workspace whose one feature table also holds the rows of another dataset."""
    from valuegate.storage.samples import ensure_sample_tables

    w = Workspace(str(tmp_path / "ws"))
    ensure_sample_tables(w)
    ingest_file(w, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(14, seed=31)), 10_000)
    ingest_file(w, "other", write_jsonl(tmp_path / "o.jsonl", random_rows(5, seed=32)), 10_000)
    register_valset(w, "val", write_jsonl(tmp_path / "v.jsonl", random_rows(7, seed=33)), 10_000)
    MODEL[w.uri] = str(tiny_model_dir())
    extract_for_run(w, "other", "val", _settings(w), progress=False)
    return w


MODEL: dict[str, str] = {}  # workspace → its tiny model


def _settings(ws, **score):
    return load_settings(overrides={"model": {"name": MODEL[ws.uri], "device": "cpu"}, "workspace": ws.uri,
                                    "score": {"signals": False, **score}})


def _by_id(table) -> dict:
    d = table.to_pydict()
    order = np.argsort(d["id"])
    return {k: [v[i] for i in order] for k, v in d.items()}


def test_streamed_mean_equals_the_chunked_mean(ws, monkeypatch):
    scans = []
    real = score_mod.score_streaming
    monkeypatch.setattr(score_mod, "score_streaming", lambda *a, **k: scans.append(1) or real(*a, **k))
    for how in ("none", "length", "cosine"):
        settings = _settings(ws, aggregate="mean", normalize=how)
        streamed = score_dataset(ws, "d", "val", settings, progress=False, write=False)
        assert len(scans) == 1  # 14 of the table's 19 rows: one scan (rows of `other` skipped)
        monkeypatch.setattr(score_mod, "STREAM_MIN_SHARE", 2.0)  # the chunked reads by id
        chunked = score_dataset(ws, "d", "val", settings, progress=False, write=False)
        monkeypatch.setattr(score_mod, "STREAM_MIN_SHARE", 0.5)
        assert len(scans) == 1
        scans.clear()
        assert streamed.table.column("id").to_pylist() == chunked.table.column("id").to_pylist()  # same order
        a, b = _by_id(streamed.table), _by_id(chunked.table)
        assert len(a["id"]) == 14 and np.isfinite(a["value"]).all()
        np.testing.assert_allclose(a["value"], b["value"], rtol=1e-9, atol=1e-300, err_msg=how)
        for col in COLUMNS:
            assert a[col] == b[col], col


def test_streamed_mean_reports_a_sample_without_features(ws, monkeypatch):
    settings = _settings(ws, aggregate="mean")
    extracted, _, _ = extract_for_run(ws, "d", "val", settings, progress=False)
    plan = score_mod.plan_run(ws, "d", extracted, settings)
    plan.ids.append("no-such-sample")
    ctx = score_mod.load_context(ws, plan, settings)
    with pytest.raises(score_mod.ValuegateError, match="1 samples have no stored features"):
        score_mod.score_streaming(ws, plan, ctx, settings)


def test_nearest_by_candidates_equals_the_exhaustive_nearest_when_every_sample_is_one(ws):
    ref = score_dataset(ws, "d", "val", _settings(ws, aggregate="nearest", nearest_k=3, nearest_candidates=0),
                        progress=False, write=False)
    got = score_dataset(ws, "d", "val", _settings(ws, aggregate="nearest", nearest_k=3, nearest_candidates=7),
                        progress=False, write=False)
    a, b = _by_id(got.table), _by_id(ref.table)
    assert a["nearest_ids"] == b["nearest_ids"]
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a["nearest_values"]), np.asarray(b["nearest_values"]), rtol=1e-5)
    # fewer candidates than validation samples: sketches (stored ones when the table has them) pick them
    few = score_dataset(ws, "d", "val", _settings(ws, aggregate="nearest", nearest_k=1, nearest_candidates=3),
                        progress=False, write=False)
    exact = score_dataset(ws, "d", "val", _settings(ws, aggregate="nearest", nearest_k=1, nearest_candidates=0),
                          progress=False, write=False)
    f, e = _by_id(few.table), _by_id(exact.table)
    assert len(f["nearest_ids"]) == 14 and all(len(n) == 1 for n in f["nearest_ids"])
    assert np.mean([x == y for x, y in zip(f["nearest_ids"], e["nearest_ids"], strict=True)]) >= 0.5


def test_stored_sketches_are_the_ones_scoring_would_compute(ws):
    """The candidate search reads the feature table's ``sketch`` column when it has one: it must be the
    count sketch of the stored rows that scoring computes when it has none (same columns, same seed)."""
    from valuegate.engine.aggregate import sketch_dim
    from valuegate.engine.sketch import count_sketch

    settings = _settings(ws, aggregate="nearest", nearest_candidates=3)
    settings = settings.model_copy(update={"extract": settings.extract.model_copy(update={"sketch_dim": 64})})
    extracted, _, _ = extract_for_run(ws, "d", "val", settings, progress=False)
    plan = score_mod.plan_run(ws, "d", extracted, settings)
    assert "sketch" in score_mod._stored_schema(ws, plan.fp_t).names
    cols = score_mod._feature_columns(settings, score_mod._stored_schema(ws, plan.fp_t))
    assert "sketch" in cols
    t = score_mod.fstore.read_features(ws, plan.fp_t, plan.ids, cols)
    m, tt = score_mod._feature_matrix(t, plan.ids, plan.vocab, plan.width)
    stored = score_mod._sketches(tt, len(plan.ids), sketch_dim(settings))
    assert stored is not None
    np.testing.assert_allclose(stored, count_sketch(m, sketch_dim(settings), seed=settings.extract.seed),
                               rtol=2e-3, atol=2e-3 * float(np.abs(stored).max()))
    ctx = score_mod.load_context(ws, plan, settings)
    assert ctx.cand.sketch is not None and ctx.cand.sketch.shape == (7, sketch_dim(settings))


def test_candidates_without_stored_sketches_are_said_once(ws, caplog):
    """``nearest_candidates > 0`` on features stored without a sketch (``extract.sketch_dim = 0``, the
    default) sketches every row while scoring, about 1.4 ms a row: the run says so, once; the exact
    nearest (the default) and stored sketches say nothing."""
    import logging

    with caplog.at_level(logging.WARNING, logger="valuegate"):
        score_dataset(ws, "d", "val", _settings(ws, aggregate="nearest", nearest_candidates=3), progress=False,
                      write=False)
    said = [r.getMessage() for r in caplog.records if "nearest_candidates" in r.getMessage()]
    assert len(said) == 1 and "no count sketch" in said[0] and "extract.sketch_dim" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="valuegate"):
        score_dataset(ws, "d", "val", _settings(ws, aggregate="nearest"), progress=False, write=False)
        settings = _settings(ws, aggregate="nearest", nearest_candidates=3)
        settings = settings.model_copy(update={"extract": settings.extract.model_copy(update={"sketch_dim": 64})})
        score_dataset(ws, "d", "val", settings, progress=False, write=False)
    assert not [r for r in caplog.records if "nearest_candidates" in r.getMessage()]


def test_score_shards_with_signals_off_equal_the_streamed_run(ws):
    """The dask/ray path scores shards by id (no scan): the same values as the one-scan run."""
    from valuegate.storage.lance import sql_str
    from valuegate.tasks.extract import shard_ids

    settings = _settings(ws, aggregate="mean", normalize="cosine")
    whole = _by_id(score_dataset(ws, "d", "val", settings, progress=False, write=False).table)
    plan, _, _, _ = score_mod.plan_scoring(ws, "d", "val", settings, progress=False)
    score_mod._CONTEXT.clear()
    assert [score_mod.score_shard(plan, ids, settings)["scored"] for ids in shard_ids(plan.ids, 6)] == [6, 6, 2]
    got = _by_id(ws.read(schemas.SCORES, where=f"run_id = {sql_str(plan.run_id)}"))
    assert got["id"] == whole["id"]
    np.testing.assert_allclose(got["value"], whole["value"], rtol=1e-9, atol=1e-300)


def test_scores_rows_keep_no_view_of_the_feature_batch(ws):
    """A scores row built from a streamed batch must not point into the batch's buffers (a zero-copy view
    keeps the whole batch alive: the scan then held every row it read, over 11 GB at 1M rows)."""
    from valuegate.engine.aggregate import ChunkScores

    settings = _settings(ws, aggregate="mean")
    extracted, _, _ = extract_for_run(ws, "d", "val", settings, progress=False)
    plan = score_mod.plan_run(ws, "d", extracted, settings)
    ctx = score_mod.load_context(ws, plan, settings)
    batch = next(score_mod.fstore.iter_features(ws, plan.fp_t, ["id", "truncated", "n_tokens", "mean_loss",
                                                               "uncond_loss", "self_influence", "mean_hidden"]))
    tt = score_mod.pa.Table.from_batches([batch])
    spans = [(b.address, b.address + b.size) for col in tt.columns for chunk in col.chunks
             for b in chunk.buffers() if b is not None]
    out = score_mod._chunk_table(plan, ctx, settings, tt["id"].to_pylist(), tt,
                                 lambda t_self, *_: ChunkScores(np.zeros(len(t_self))))
    shared = [name for name, col in zip(out.column_names, out.columns, strict=True) for chunk in col.chunks
              for b in chunk.buffers() if b is not None and b.size
              and any(lo <= b.address < hi for lo, hi in spans)]
    assert shared == []


@pytest.mark.parametrize("aggregate", ["mean", "nearest"])
def test_rows_come_back_in_the_order_asked_whatever_the_stored_order(ws, aggregate):
    """score_rows scores the rows in the order the store returns them and reorders the scores: asked
    in reverse (or shuffled) they come back in that order with the same values."""
    settings = _settings(ws, aggregate=aggregate, nearest_k=2, nearest_candidates=3)
    extracted, _, _ = extract_for_run(ws, "d", "val", settings, progress=False)
    plan = score_mod.plan_run(ws, "d", extracted, settings)
    ctx = score_mod.load_context(ws, plan, settings)
    ids = list(plan.ids)
    ref, _, _ = score_mod.score_rows(ws, plan, ctx, settings, ids)
    shuffled = [ids[i] for i in np.random.default_rng(3).permutation(len(ids))]
    for asked in (ids[::-1], shuffled):
        got, _, _ = score_mod.score_rows(ws, plan, ctx, settings, asked)
        assert got.column("id").to_pylist() == asked
        by_id = dict(zip(ref.column("id").to_pylist(), ref.column("value").to_pylist(), strict=True))
        assert got.column("value").to_pylist() == [by_id[i] for i in asked]
        assert got.column("nearest_ids").to_pylist() == [ref.column("nearest_ids").to_pylist()[ids.index(i)]
                                                         for i in asked]
