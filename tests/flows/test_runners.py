"""The refresh flow on Dask and Ray task runners (local clusters of real worker processes, started and
stopped by the run): the same scores as the local runner, every feature row once, one model load per
worker process."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from test_flow import _config, _run
from tiny import assert_close_at_stored_precision

from valuegate.errors import ValuegateError
from valuegate.settings import load_settings
from valuegate.tasks.extract import shard_ids

SHARD_SIZE = 5  # 24 training rows → 5 shards on 2 workers: each worker runs several shards


def _scores(root, run_id: str) -> dict[str, float]:
    from valuegate.storage.lance import Workspace
    from valuegate.storage.scores import read_score_run

    df = read_score_run(Workspace(str(root)), run_id, "t")
    return dict(zip(df["id"].to_list(), df["value"].to_list(), strict=True))


def _suspects(root, run_id: str) -> dict[str, float]:
    from valuegate.storage.lance import Workspace
    from valuegate.storage.scores import read_score_run

    df = read_score_run(Workspace(str(root)), run_id, "t")
    return dict(zip(df["id"].to_list(), df["suspect"].to_list(), strict=True))


def _feature_ids(root, model_fp: str) -> list[str]:
    from valuegate.storage import features as fstore
    from valuegate.storage.lance import Workspace

    return fstore.read_features(Workspace(str(root)), model_fp, columns=["id"])["id"].to_pylist()


@pytest.fixture(scope="module")
def local_scores(prefect_harness, tmp_path_factory, tiny_model_dir):
    """The local runner's scores (the reference every runner must reproduce)."""
    tmp = tmp_path_factory.mktemp("local")
    out, _ = _run(_config(tmp, tiny_model_dir()))
    assert "shards" not in out  # local: extraction inside the scoring step, as before
    return out, _scores(tmp / "ws", out["run_id"]), sorted(_feature_ids(tmp / "ws", out["model_fp"])), tmp / "ws"


def _check_runner(kind: str, tmp_path, tiny_model_dir, local_scores) -> dict:
    ref_out, ref, ref_features, ref_root = local_scores
    config = _config(tmp_path, tiny_model_dir(), runner={"kind": kind, "workers": 2, "shard_size": SHARD_SIZE})
    t0 = time.perf_counter()
    out, _ = _run(config)
    wall = time.perf_counter() - t0
    root = tmp_path / "ws"
    sh = out["shards"]
    # every training sample was extracted on the cluster, in shards (the scoring step found none missing
    # and extracted the validation set only); the count is the local runner's
    assert sh["missing"] == 24 and sh["shards"] == 5 and sh["extracted"] == 24, sh
    assert out["counts"]["extracted"] == ref_out["counts"]["extracted"] == 24
    # real worker processes, each loading the model once for all the shards it ran
    assert 1 <= sh["workers"] <= 2 and sh["model_loads"] == sh["workers"], sh
    # every feature row exactly once: the local run's rows (24 training + 5 validation samples, one
    # fingerprint here as the ratio is 1)
    ids = _feature_ids(root, out["model_fp"])
    assert sorted(ids) == ref_features and len(set(ids)) == len(ids) == 29
    assert out["model_fp"] == ref_out["model_fp"]
    got = _scores(root, out["run_id"])
    assert sorted(got) == sorted(ref)
    a = np.array([got[i] for i in sorted(ref)])
    b = np.array([ref[i] for i in sorted(ref)])
    assert_close_at_stored_precision(a, b)  # the shards extract in other batches
    # scored in shards on the workers too, each worker process reading the validation side once; the
    # suspect scores (local reference, calibration) equal the local runner's
    ss = out["score_shards"]
    assert ss["shards"] == ss["submitted"] == 5 and 1 <= ss["workers"] <= 2, ss
    assert ss["context_loads"] == ss["workers"], ss
    sus, ref_sus = _suspects(root, out["run_id"]), _suspects(ref_root, ref_out["run_id"])
    assert_close_at_stored_precision([sus[i] for i in sorted(ref)], [ref_sus[i] for i in sorted(ref)])
    # a second run finds nothing missing: no shard, no cluster, the scores from the cache
    again, _ = _run(config)
    assert again["shards"]["shards"] == 0 and again["run_id"] == out["run_id"]
    assert again["score_shards"]["submitted"] == 0
    assert len(_feature_ids(root, out["model_fp"])) == 29
    dev = float(np.max(np.abs(a - b)) / np.abs(b).max())
    print(f"{kind}: first run {wall:.1f}s ({out['timings']['extract']:.1f}s extract), "
          f"max |Δvalue| / max |value| = {dev:.1e}")
    return out


def test_shards_are_deterministic_and_cover_each_id_once():
    ids = [f"id{i:03d}" for i in range(23)]
    shards = shard_ids(ids, 5)
    assert [len(s) for s in shards] == [5, 5, 5, 5, 3]
    assert sorted(i for s in shards for i in s) == ids
    assert shard_ids(list(reversed(ids)) + ids[:4], 5) == shards  # order and repeats do not matter
    assert shard_ids([], 5) == []
    with pytest.raises(ValuegateError):
        shard_ids(ids, 0)


def test_runner_settings_and_flags(tmp_path):
    from valuegate.cli import _parser

    s = load_settings(None, {"runner": {"kind": "dask", "workers": 3, "address": None}})
    assert (s.runner.kind, s.runner.workers, s.runner.address, s.runner.shard_size) == ("dask", 3, None, 2000)
    assert load_settings().runner.kind == "local"
    with pytest.raises(ValuegateError, match="runner"):
        load_settings(None, {"runner": {"kind": "spark"}})
    args = _parser().parse_args(["run", "--runner", "ray", "--workers", "4", "--address", "auto"])
    assert (args.runner, args.workers, args.address) == ("ray", 4, "auto")


def test_dask_runner_scores_equal_local(prefect_harness, tmp_path, tiny_model_dir, local_scores):
    _check_runner("dask", tmp_path, tiny_model_dir, local_scores)


def test_ray_runner_scores_equal_local(prefect_harness, tmp_path, tiny_model_dir, local_scores):
    _check_runner("ray", tmp_path, tiny_model_dir, local_scores)


def test_s3_workspace_end_to_end_on_dask(prefect_harness, tmp_path, tiny_model_dir, local_scores, s3_server,
                                         monkeypatch):
    """ingest → extract (2 Dask worker processes) → score → gate → release with the workspace on the S3
    server: the workers reach the store, not each other's disk; the release read back from S3 carries the
    local run's scores; the flow's cache (a local folder keyed by the workspace id) answers a second run."""
    from valuegate.storage import releases as store

    ref_out, ref, ref_features, ref_root = local_scores
    uri = s3_server.make_bucket("vg-flow-dask") + "/ws"
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "VALUEGATE_RESULTS_DIR": str(tmp_path / "results")}
    for k, v in env.items():  # what a user exports; the cluster's worker processes inherit it
        monkeypatch.setenv(k, v)
    config = _config(tmp_path, tiny_model_dir(), runner={"kind": "dask", "workers": 2, "shard_size": SHARD_SIZE})
    path = Path(config)
    text = path.read_text().replace(f'workspace = "{tmp_path / "ws"}"', f'workspace = "{uri}"')
    assert uri in text
    path.write_text(text)

    out, _ = _run(config)
    sh = out["shards"]
    assert sh["missing"] == 24 and sh["extracted"] == 24 and 1 <= sh["workers"] <= 2, sh
    assert not (tmp_path / "ws").exists()  # nothing of the workspace on local disk
    ws = _ws_from_env(uri)
    ids = _feature_ids_ws(ws, out["model_fp"])
    assert sorted(ids) == ref_features and len(set(ids)) == len(ids)

    # the release, read back from S3, equals the local run's
    version = out["version"]
    assert out["current"] and store.read_current(ws, "r") == version
    rel_scores = store.read_release_scores(ws, "r", version)
    got = dict(zip(rel_scores["id"].to_list(), rel_scores["value"].to_list(), strict=True))
    assert sorted(got) == sorted(ref)
    a = np.array([got[i] for i in sorted(ref)])
    b = np.array([ref[i] for i in sorted(ref)])
    assert_close_at_stored_precision(a, b)
    data = store.read_release_data(ws, "r", version, columns=["id", "value"], verify=True).sort("id")
    local = store.read_release_data(ref_root, "r", ref_out["version"], columns=["id", "value"]).sort("id")
    assert data["id"].to_list() == local["id"].to_list()
    assert_close_at_stored_precision(data["value"].to_numpy(), local["value"].to_numpy())
    assert out["report"] == store.release_uri(ws, "r", version) + "/report.html"
    objects = {o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket="vg-flow-dask", Prefix=f"ws/releases/r/{version}/")["Contents"]}
    assert {f"ws/releases/r/{version}/{k}" for k in ("data.parquet", "scores.parquet", "manifest.json",
                                                     "report.html")} <= objects
    assert any("/gate/" in k for k in objects)  # the gate's Data Docs went along

    # a second run: the cached steps answer from the local results folder, no shard, nothing new to release
    again, _ = _run(config)
    assert again["shards"]["shards"] == 0 and again["run_id"] == out["run_id"]
    assert "score" in again["cached_steps"] and again["previous"] == version
    assert any((tmp_path / "results").iterdir())


def _ws_from_env(uri: str):
    from valuegate.storage.lance import Workspace

    return Workspace.from_env(uri)


def _feature_ids_ws(ws, model_fp: str) -> list[str]:
    from valuegate.storage import features as fstore

    return fstore.read_features(ws, model_fp, columns=["id"])["id"].to_pylist()
