"""Features are stored exactly once per (id, fingerprint), whatever the interleaving of the processes that
extract them (issue 15, point 2): two processes extracting one dataset into one fresh workspace at once."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from tiny import random_rows, write_jsonl

from valuegate.settings import load_settings
from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace
from valuegate.tasks.ingest import ingest_file


def _extract_in_process(uri: str, model_dir: str, barrier) -> int:
    from valuegate.tasks.extract import extract_dataset

    ws = Workspace(uri)
    settings = load_settings(overrides={"model": {"name": model_dir, "device": "cpu"},
                                        "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8,
                                                    "batch_size": 4}, "workspace": uri})
    sstore.dataset_ids(ws, "d")  # open the connection before the start line
    barrier.wait()
    return extract_dataset(ws, "d", settings, progress=False).extracted


@pytest.mark.parametrize("processes", [2])
def test_concurrent_extractions_store_every_feature_row_once(tmp_path, tiny_model_dir, processes):
    ws = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(ws)
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(30, seed=41)), 10_000)
    ctx = mp.get_context("spawn")  # LanceDB is not fork-safe
    with ctx.Manager() as manager, ctx.Pool(processes) as pool:
        barrier = manager.Barrier(processes, timeout=300)
        extracted = pool.starmap(_extract_in_process,
                                 [(ws.uri, str(tiny_model_dir()), barrier)] * processes)
    sets = ws.read(schemas.FEATURE_SETS).to_pylist()
    assert len(sets) == 1, f"{len(sets)} registry rows for one fingerprint"
    ids = ws.read(schemas.features_table(sets[0]["model_fp"]), columns=["id"])["id"].to_pylist()
    assert set(ids) == set(sstore.dataset_ids(ws, "d"))
    assert len(ids) == len(set(ids)) == 30, f"{len(ids)} feature rows for {len(set(ids))} ids"
    assert sum(extracted) >= 30  # each process reports what it extracted (both may have run the model)
