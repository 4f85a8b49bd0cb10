"""Sharded scoring (issue 8): a run scored shard by shard, on whichever process, equals the run scored in
one go, and a retried shard leaves each row once."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import random_rows, write_jsonl

from valuegate.settings import load_settings
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace, sql_str
from valuegate.tasks import score as score_mod
from valuegate.tasks.extract import shard_ids
from valuegate.tasks.ingest import ingest_file
from valuegate.tasks.score import load_context, plan_scoring, score_dataset, score_shard
from valuegate.tasks.validation_set import register_valset


@pytest.fixture
def ws(tmp_path):
    w = Workspace(str(tmp_path / "ws"))
    from valuegate.storage.samples import ensure_sample_tables

    ensure_sample_tables(w)
    return w


@pytest.mark.parametrize("aggregate", ["mean", "nearest"])
def test_score_shards_equal_one_run_and_a_retry_duplicates_nothing(ws, tmp_path, tiny_model_dir, monkeypatch,
                                                                   aggregate):
    model = tiny_model_dir()
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(13, seed=21)), 10_000)
    register_valset(ws, "val", write_jsonl(tmp_path / "v.jsonl", random_rows(6, seed=22)), 10_000)
    settings = load_settings(overrides={"model": {"name": str(model), "device": "cpu"}, "workspace": ws.uri,
                                        "score": {"aggregate": aggregate, "nearest_k": 2}})
    whole = score_dataset(ws, "d", "val", settings, progress=False, write=False).table.to_pydict()
    plan, _, _, _ = plan_scoring(ws, "d", "val", settings, progress=False)
    assert plan.run_id != whole["run_id"][0]

    reads = []
    real_load = score_mod.load_context
    monkeypatch.setattr(score_mod, "load_context", lambda *a: reads.append(1) or real_load(*a))
    score_mod._CONTEXT.clear()
    shards = shard_ids(plan.ids, 5)
    assert [len(s) for s in shards] == [5, 5, 3]
    outs = [score_shard(plan, ids, settings) for ids in shards]
    again = score_shard(plan, shards[1], settings)  # a retried shard (the first attempt had committed)
    assert [o["scored"] for o in outs] == [5, 5, 3] and again["scored"] == 5
    assert len(reads) == 1 and again["context_loads"] == 1  # the validation side read once per process

    got = ws.read(schemas.SCORES, where=f"run_id = {sql_str(plan.run_id)}").to_pydict()
    assert sorted(got["id"]) == sorted(whole["id"]) and len(set(got["id"])) == 13
    pos = {i: n for n, i in enumerate(got["id"])}
    order = [pos[i] for i in whole["id"]]
    for col in ("value", "suspect", "centred_value_mean", "log_self_influence", "hard_mean_loss", "mean_loss"):
        np.testing.assert_allclose(np.asarray(got[col])[order], whole[col], rtol=1e-9, err_msg=col)
    assert [got["suspect_reason"][p] for p in order] == whole["suspect_reason"]
    assert [got["nearest_ids"][p] for p in order] == whole["nearest_ids"]
    assert set(got["valset"]) == {"val@v1"} and set(got["model_fp"]) == {plan.fp_t}


def test_context_reads_only_the_validation_side(ws, tmp_path, tiny_model_dir):
    model = tiny_model_dir()
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(4, seed=31)), 10_000)
    register_valset(ws, "val", write_jsonl(tmp_path / "v.jsonl", random_rows(3, seed=32)), 10_000)
    settings = load_settings(overrides={"model": {"name": str(model), "device": "cpu"}, "workspace": ws.uri})
    plan, _, _, _ = plan_scoring(ws, "d", "val", settings, progress=False)
    ctx = load_context(ws, plan, settings)
    assert list(ctx.vids) == plan.vids
    # the fault reference: the 3 validation samples and the run's 4 training rows (fewer than score.fault_pool)
    assert ctx.faults is not None and ctx.faults.pool_unit.shape[0] == 7 and len(ctx.fault_pool) == 4
