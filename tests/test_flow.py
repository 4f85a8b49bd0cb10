"""The refresh DAG on a tiny model, on Prefect's test harness (a real local Prefect API)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from tiny import random_rows, write_jsonl

from valuegate.errors import ValuegateError


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _config(tmp_path, model_dir, **sections) -> str:
    rows = random_rows(24, seed=21)
    for i, r in enumerate(rows):
        r["family"] = "ab"[i % 2]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    valid = write_jsonl(tmp_path / "valid.jsonl", random_rows(5, seed=22))
    cfg = {
        "workspace": str(tmp_path / "ws"),
        "data": {"dataset": "t", "sources": [str(train)], "valset": "v", "valset_file": str(valid)},
        "model": {"name": str(model_dir), "device": "cpu"},
        "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8, "batch_size": 8},
        "select": {"policy": "top_fraction", "fraction": 0.75, "group_by": "family"},
        "gate": {"min_retained_fraction": 0.5, "min_group_retention": 0.1},
        "release": {"name": "r"},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    lines = []
    for key, val in cfg.items():
        if not isinstance(val, dict):
            lines.append(f"{key} = {json.dumps(val)}")
    for key, val in cfg.items():
        if isinstance(val, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in val.items()]
    path = tmp_path / "vg.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_refresh_releases_and_a_failed_gate_keeps_the_previous_release(prefect_harness, tmp_path, tiny_model_dir):
    from pathlib import Path

    from valuegate.flows.refresh import refresh
    from valuegate.storage.releases import list_releases, read_current, read_manifest, read_release_data

    config = _config(tmp_path, tiny_model_dir())
    out = refresh(config=config)
    root = Path(tmp_path / "ws")
    assert out["current"] and read_current(root, "r") == out["version"]
    data = read_release_data(root, "r", out["version"])
    assert data.height == 18 and data["id"].n_unique() == 18  # ceil(0.75 · 24)
    manifest = read_manifest(root, "r", out["version"])
    assert manifest["valset"] == "v@v1" and manifest["gate"]["passed"] is True
    assert manifest["model_fp"] == out.get("model_fp", manifest["model_fp"])
    # a second run: nothing new to extract, a new release
    again = refresh(config=config)
    assert again["version"] != out["version"] and again["counts"]["extracted"] == 0
    # a gate that cannot pass: the release is written, never current, the previous stays current
    failing = _config(tmp_path, tiny_model_dir(), gate={"min_retained_fraction": 0.9})
    with pytest.raises(ValuegateError, match="gate failed"):
        refresh(config=failing)
    assert read_current(root, "r") == again["version"]
    versions = [m["version"] for m in list_releases(root, "r")]
    assert len(versions) == 3
    failed = read_manifest(root, "r", versions[-1])
    assert failed["gate"]["passed"] is False and any("retained" in f for f in failed["gate"]["failures"])
    assert pl.read_parquet(root / "releases" / "r" / out["version"] / "data.parquet").height == 18


def test_scheduled_deployment_is_registered_on_the_server(prefect_harness):
    from prefect.client.orchestration import get_client

    from valuegate.flows.serve import register_deployment

    dep_id = register_deployment("nightly-test", "0 3 * * *", "/tmp/vg.toml")
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(dep_id)
    assert dep.name == "nightly-test" and dep.parameters == {"config": "/tmp/vg.toml"}
    crons = [s.schedule.cron for s in dep.schedules]
    assert crons == ["0 3 * * *"]


def test_refresh_against_a_real_local_server(tmp_path, tiny_model_dir):
    """`prefect server start` on 127.0.0.1, `valuegate run` pointed at it, the final state read back."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from valuegate.flows.serve import start_local_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "prefect-home"
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": "127.0.0.1"}
    server = start_local_server(port, env)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 150
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, "prefect server exited"
            assert time.time() < deadline, "prefect server did not answer in time"
            time.sleep(1)
        config = _config(tmp_path, tiny_model_dir())
        run = subprocess.run([sys.executable, "-m", "valuegate.cli", "run", "--config", config],
                             env={**os.environ, **env, "PREFECT_API_URL": api}, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert [(r["name"] != "", r["state_type"]) for r in runs] == [(True, "COMPLETED")]
        flows = httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()
        assert [f["name"] for f in flows] == ["refresh"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_failed_task_resumes_without_redoing_finished_work(prefect_harness, tmp_path, tiny_model_dir,
                                                             monkeypatch):
    """The gate crashes once (not a verdict: an exception); the re-run skips ingestion and extraction."""
    from pathlib import Path

    from valuegate.flows.refresh import refresh
    from valuegate.storage.releases import read_current
    from valuegate.tasks import gate as gate_mod

    real = gate_mod.run_gate
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected crash in the gate")
        return real(*a, **k)

    monkeypatch.setattr(gate_mod, "run_gate", flaky)
    config = _config(tmp_path, tiny_model_dir())
    with pytest.raises(RuntimeError, match="injected crash"):
        refresh(config=config)
    assert read_current(Path(tmp_path / "ws"), "r") is None
    out = refresh(config=config)
    assert out["counts"]["extracted"] == 0 and out["counts"]["new_samples"] == 0
    assert read_current(Path(tmp_path / "ws"), "r") == out["version"]


def test_two_refresh_runs_at_once_on_one_workspace(prefect_harness, tmp_path, tiny_model_dir):
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from valuegate.flows.refresh import refresh
    from valuegate.storage import samples as sstore
    from valuegate.storage.lance import Workspace
    from valuegate.storage.releases import list_releases

    config = _config(tmp_path, tiny_model_dir())
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: refresh(config=config), range(2)))
    assert len({o["version"] for o in outs}) == 2
    root = Path(tmp_path / "ws")
    assert [m["version"] for m in list_releases(root, "r")] == sorted(o["version"] for o in outs)
    ws = Workspace(str(root))
    members = sstore.read_members(ws, "t").to_pylist()
    assert len(members) == 24 and len({(m["source"], m["row"]) for m in members}) == 24
