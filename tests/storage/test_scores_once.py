"""Every row of a scores run is stored once (issue 15, point 2): the local write is an insert-if-absent on
``(run_id, id)``, the one the sharded path uses, so a write repeated after a commit that did land (an inner
retry after a transient error, a Prefect retry) leaves each row once."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
from tiny import random_rows, write_jsonl

from valuegate.settings import load_settings
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace, sql_str
from valuegate.storage.samples import ensure_sample_tables
from valuegate.storage.scores import write_scores
from valuegate.tasks.ingest import ingest_file
from valuegate.tasks.score import score_dataset
from valuegate.tasks.validation_set import register_valset


@pytest.fixture
def scored(tmp_path, tiny_model_dir):
    ws = Workspace(str(tmp_path / "ws"))
    ensure_sample_tables(ws)
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(7, seed=51)), 10_000)
    register_valset(ws, "val", write_jsonl(tmp_path / "v.jsonl", random_rows(4, seed=52)), 10_000)
    settings = load_settings(overrides={"model": {"name": str(tiny_model_dir()), "device": "cpu"},
                                        "workspace": ws.uri})
    return ws, score_dataset(ws, "d", "val", settings, progress=False)


def _run_ids(ws, run_id: str) -> list[str]:
    return ws.read(schemas.SCORES, where=f"run_id = {sql_str(run_id)}", columns=["id"])["id"].to_pylist()


def test_writing_a_run_again_leaves_each_row_once(scored):
    ws, rep = scored
    first = ws.read(schemas.SCORES, where=f"run_id = {sql_str(rep.run_id)}")
    assert sorted(_run_ids(ws, rep.run_id)) == sorted(rep.table["id"].to_pylist()) and first.num_rows == 7

    write_scores(ws, rep.table)  # the write of score_dataset repeated after its commit landed
    write_scores(ws, rep.table.slice(2, 3))  # and a part of it
    ids = _run_ids(ws, rep.run_id)
    assert len(ids) == len(set(ids)) == 7 and ws.count(schemas.SCORES) == 7
    # the rows first committed stay as they were (insert-if-absent, not replaced)
    again = ws.read(schemas.SCORES, where=f"run_id = {sql_str(rep.run_id)}")
    key = [("id", "ascending")]
    assert again.take(pc.sort_indices(again, key)).equals(first.take(pc.sort_indices(first, key)))


def test_another_run_of_the_same_ids_is_kept_apart(scored):
    ws, rep = scored
    other = rep.table.set_column(rep.table.schema.get_field_index("run_id"), "run_id",
                                 pc.replace_substring(rep.table["run_id"], rep.run_id, rep.run_id + "-b"))
    write_scores(ws, other)
    assert sorted(_run_ids(ws, rep.run_id + "-b")) == sorted(_run_ids(ws, rep.run_id))
    assert ws.count(schemas.SCORES) == 14


def test_the_flow_counts_truncated_and_unscored_samples_alike_on_every_runner(prefect_harness, tmp_path,
                                                                              tiny_model_dir):
    """The dask path (plan-scores + score shards) returns ``truncated``, ``unscored`` and ``unscored_ids`` as
    the local score task does (here: scoring the same stored dataset locally), so the run's counts do
    not depend on the runner."""
    import json

    from test_flow import _config, _run
    from tiny import WORDS

    from valuegate.settings import load_settings

    def words(i: int, n: int) -> str:
        return " ".join(WORDS[(i + j) % 40] for j in range(n))

    config = _config(tmp_path, tiny_model_dir(), extract={"max_length": 12, "template": "none"},  # words = tokens
                     runner={"kind": "dask", "workers": 1, "shard_size": 10})
    extra = [{"prompt": words(1, 2) + " ", "response": words(9, 16), "family": "a"},  # cut at 12 tokens
             {"prompt": words(3, 14) + " ", "response": words(5, 2), "family": "b"}]  # response past 12
    with open(tmp_path / "train.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in extra)
    out, _ = _run(config)
    ws = Workspace(str(tmp_path / "ws"))
    flags = ws.read(schemas.SCORES, where=f"run_id = {sql_str(out['run_id'])}", columns=["truncated"])["truncated"]
    assert out["score_shards"]["submitted"] == 3 and flags.null_count == 0

    local = score_dataset(ws, "t", out["valset"], load_settings(config), progress=False, write=False)
    assert local.truncated >= 1 and local.unscored == {"every counted token lies beyond max_length": 1}
    assert out["counts"]["truncated"] == local.truncated == pc.sum(flags).as_py()
    assert out["counts"]["unscored"] == 1 and out["counts"]["scored"] == local.n_train == 25
