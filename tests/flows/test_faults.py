"""Faults on a real cluster: a worker process killed half-way through a shard, and a run that loses its
whole cluster. Real processes die (SIGKILL from inside the shard: the test-only hook of
tests/fault_plugin.py, fixture ``fault_spec``); nothing is mocked. Every feature row must end up stored
exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_plugin import FAULT_ENV
from test_flow import _config, _run
from test_runners import _feature_ids, _scores

SHARD_SIZE = 5  # 24 training rows → 5 shards


def test_worker_killed_mid_shard_is_retried_without_duplicates(prefect_harness, tmp_path, tiny_model_dir,
                                                               fault_spec):
    fault_spec.write_text(json.dumps({"at_shard": 1}))  # the env names it: the cluster's workers inherit it
    spec = str(fault_spec)
    config = _config(tmp_path, tiny_model_dir(), runner={"kind": "dask", "workers": 2, "shard_size": SHARD_SIZE})
    out, _ = _run(config)
    killed = json.loads(Path(spec + ".killed").read_text())
    sh = out["shards"]
    # the killed worker had committed half of its shard; the shard ran again on a live worker (Dask
    # reschedules a task whose worker died) and extracted only the other half: 24 extractions in all
    assert len(killed["ids"]) == 2 and sh["missing"] == 24 and sh["shards"] == 5, sh
    assert sh["extracted"] + len(killed["ids"]) == 24, sh
    ids = _feature_ids(tmp_path / "ws", out["model_fp"])
    assert len(ids) == len(set(ids)) == 29  # 24 training + 5 validation rows, each exactly once
    assert set(killed["ids"]) <= set(ids)
    assert len(_scores(tmp_path / "ws", out["run_id"])) == 24 and out["current"]


def _dask_cluster(tmp_path):
    """A Dask scheduler and 2 single-threaded worker processes, each side in its own process group."""
    import os
    import subprocess
    import sys
    import time
    dask = str(Path(sys.executable).with_name("dask"))
    sched_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "ab")  # noqa: SIM115 - closed by the caller
    sched = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                              "--scheduler-file", str(sched_file)], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env=dict(os.environ))
    deadline = time.monotonic() + 60
    while not sched_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    address = json.loads(sched_file.read_text())["address"]
    workers = subprocess.Popen([dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                                "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=dict(os.environ))
    from distributed import Client

    with Client(address, timeout=60) as c:
        c.wait_for_workers(2, timeout=120)
    return address, sched, workers, log


def test_lost_cluster_fails_clearly_and_the_next_run_resumes(prefect_harness, tmp_path, tiny_model_dir,
                                                             fault_spec, monkeypatch):
    from valuegate.errors import ValuegateError

    spec_path = fault_spec  # the fixture set the env before the cluster starts: its workers inherit it
    address, sched, workers, log = _dask_cluster(tmp_path)
    try:
        spec_path.write_text(json.dumps({"at_shard": 2, "kill": [-sched.pid, -workers.pid]}))
        config = _config(tmp_path, tiny_model_dir(),
                         runner={"kind": "dask", "address": address, "shard_size": SHARD_SIZE})
        with pytest.raises(ValuegateError, match=r"lost the dask cluster at tcp://127\.0\.0\.1:\d+ during "
                           r"sharded extraction \(FutureCancelledError.*scheduler-connection-lost.*\); "
                           r"\d+ of the 24 missing samples were extracted and are stored") as info:
            _run(config)
        import re

        stored = int(re.search(r"(\d+) of the 24 missing", str(info.value)).group(1))
        killed = json.loads(Path(f"{spec_path}.killed").read_text())
        assert 1 <= stored < 24 and len(killed["ids"]) >= 1
    finally:
        import contextlib
        import os
        import signal

        for p in (sched, workers):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        log.close()

    # the cluster is gone; the rows committed before it went are each stored once
    from valuegate.storage import schemas
    from valuegate.storage.lance import Workspace

    [fp] = Workspace(str(tmp_path / "ws")).read(schemas.FEATURE_SETS)["model_fp"].to_pylist()
    ids = _feature_ids(tmp_path / "ws", fp)
    assert len(ids) == len(set(ids)) == stored and set(killed["ids"]) <= set(ids)

    # the next run (a fresh local cluster, no fault) extracts only what is missing, and completes
    monkeypatch.delenv(FAULT_ENV)
    config = _config(tmp_path, tiny_model_dir(), runner={"kind": "dask", "workers": 2, "shard_size": SHARD_SIZE})
    out, _ = _run(config)
    assert out["model_fp"] == fp and out["current"]
    assert out["shards"]["missing"] == out["shards"]["extracted"] == 24 - stored, out["shards"]
    ids = _feature_ids(tmp_path / "ws", fp)
    assert len(ids) == len(set(ids)) == 29  # 24 training + 5 validation samples, each once
    assert len(_scores(tmp_path / "ws", out["run_id"])) == 24
