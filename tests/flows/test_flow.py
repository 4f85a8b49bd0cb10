"""The refresh DAG on a tiny model, on Prefect's test harness (a real local Prefect API)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from tiny import random_rows, run_config, write_jsonl

from valuegate.errors import ValuegateError


def _config(tmp_path, model_dir, **sections) -> str:
    """The flow tests' run: 24 rows in two families, the top 75 % kept per the gate's group retention."""
    cfg = {"select": {"policy": "top_fraction", "fraction": 0.75, "group_by": "family"},
           "gate": {"min_retained_fraction": 0.5, "min_group_retention": 0.1}}
    for name, keys in sections.items():
        cfg[name] = {**cfg.get(name, {}), **keys}
    return run_config(tmp_path, model_dir, train=(24, 21), valid=(5, 22), families=True, **cfg)


STEPS = ["ingest", "validation-set", "extract", "score", "select", "allocate", "gate", "release", "report",
         "promote", "total"]


def _run(config: str) -> tuple[dict, str]:
    """refresh → (its summary, its flow run id); re-raises the flow's exception."""
    from valuegate.flows.refresh import refresh

    state = refresh(config=config, return_state=True)
    return state.result(), str(state.state_details.flow_run_id)


def _artifact(flow_run_id: str, key: str) -> str:
    """The data of the artifact ``key`` of a flow run (the REST filter: the sync client's read_artifacts
    cannot leave the flow-run and task-run filters out)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json={"artifacts": {
            "key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run_id]}}}).json()
    assert len(found) == 1, f"{len(found)} artifacts {key!r} of flow run {flow_run_id}"
    return found[0]["data"]


def _scores_runs(root) -> list[str]:
    from valuegate.storage import schemas
    from valuegate.storage.lance import Workspace

    return sorted(set(Workspace(str(root)).read(schemas.SCORES, columns=["run_id"])["run_id"].to_pylist()))


def _version_dirs(root, name: str = "r") -> list[str]:
    return sorted(p.name for p in (root / "releases" / name).iterdir() if p.name.startswith("v"))


def test_refresh_releases_and_a_failed_gate_keeps_the_previous_release(prefect_harness, tmp_path, tiny_model_dir):
    from valuegate.storage.releases import (
        list_releases,
        read_current,
        read_manifest,
        read_release_data,
        read_release_scores,
    )

    config = _config(tmp_path, tiny_model_dir())
    out, run_id = _run(config)
    root = tmp_path / "ws"
    assert out["current"] and read_current(root, "r") == out["version"] == "v0001" and not out["resumed"]
    data = read_release_data(root, "r", out["version"], verify=True)
    assert data.height == 18 and data["id"].n_unique() == 18  # ceil(0.75 · 24)
    manifest = read_manifest(root, "r", out["version"])
    assert manifest["valset"] == "v@v1" and manifest["gate"]["passed"] is True
    assert manifest["model_fp"] == out["model_fp"] and manifest["run_id"] == out["run_id"]
    # wall time of every step: in the summary and the summary artifact; the steps before the release also
    # in the manifest (written by the release step, as its completion record)
    assert list(out["timings"]) == STEPS and all(v >= 0 for v in out["timings"].values())
    assert out["timings"]["total"] >= sum(v for k, v in out["timings"].items() if k != "total")
    assert out["timings"]["extract"] > 0 and out["cached_steps"] == []
    assert set(manifest["timings"]) == set(STEPS[:STEPS.index("release")]) and manifest["cached_steps"] == []
    summary = _artifact(run_id, "release-summary-r")  # keyed by release: two releases' summaries never mix
    assert all(f"| {k} |" in summary for k in STEPS) and "gate: passed" in summary
    # the report explains: suspect plots and per-token highlighting of the extreme samples
    report_html = (root / "releases" / "r" / "v0001" / "report.html").read_text()
    assert "Which tokens carry the value" in report_html and report_html.count("class='tokens'") == 6
    assert "Most suspect samples" in report_html
    # every dropped row is shown beside the validation sample most like it (centred cosine of the stored mean
    # hidden states), as computed here independently
    import json
    import re

    import numpy as np

    from valuegate.storage import features as fstore
    from valuegate.storage.valsets import read_valset
    from valuegate.tasks.report import similar_validation

    scores = read_release_scores(root, "r", "v0001")
    dropped = scores.filter(~pl.col("kept"))["id"].to_list()
    from valuegate.storage.lance import Workspace

    ws = Workspace(str(root))
    vids = read_valset(ws, "v@v1")[1].sort_by("row")["id"].to_pylist()
    t = fstore.read_features(ws, out["model_fp"], ids=dropped + vids, columns=["id", "mean_hidden"])
    h = {i: np.asarray(v, dtype=np.float64) for i, v in zip(t["id"].to_pylist(), t["mean_hidden"].to_pylist(),
                                                            strict=True)}
    centre = np.mean([h[v] for v in vids], axis=0)

    def unit(x):
        return (x - centre) / np.linalg.norm(x - centre)

    want = {i: vids[int(np.argmax([unit(h[i]) @ unit(h[v]) for v in vids]))] for i in dropped}
    assert similar_validation(ws, out["model_fp"], dropped, vids) == want
    shown = json.loads(re.search(r"id='dropped-data'>(.*?)</script>", report_html, re.S).group(1))
    assert len(shown) == len(dropped) == 6 and all(r["nearest"] for r in shown)
    assert "most similar validation sample" in report_html
    # the current release is what datasets loads from the release name's folder (issue 28)
    import datasets

    current = datasets.load_dataset(str(root / "releases" / "r"), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(current["id"]) == sorted(data["id"].to_list())
    # a second run on unchanged inputs: scores come from the cache (same scores run), and nothing changed:
    # no copy of the release is written (issue 28)
    same, _ = _run(config)
    assert same["unchanged"] and same["version"] == "v0001" and same["run_id"] == out["run_id"]
    assert [m["version"] for m in list_releases(root, "r")] == ["v0001"] and read_current(root, "r") == "v0001"
    # a setting that changes the release (not the scores) writes a new one
    again, _ = _run(_config(tmp_path, tiny_model_dir(), gate={"min_retained_fraction": 0.4}))
    assert again["version"] == "v0002" and again["run_id"] == out["run_id"] and not again["resumed"]
    assert {"extract", "score"} <= set(again["cached_steps"]) and again["timings"]["extract"] == 0
    assert _scores_runs(root) == [out["run_id"]]
    # a gate that cannot pass: the release is written, never current, the previous stays current
    failing = _config(tmp_path, tiny_model_dir(), gate={"min_retained_fraction": 0.9})
    with pytest.raises(ValuegateError, match="gate failed"):
        _run(failing)
    assert read_current(root, "r") == again["version"]
    versions = [m["version"] for m in list_releases(root, "r")]
    assert versions == ["v0001", "v0002", "v0003"]
    failed = read_manifest(root, "r", "v0003")
    assert failed["gate"]["passed"] is False and any("retained" in f for f in failed["gate"]["failures"])
    assert pl.read_parquet(root / "releases" / "r" / out["version"] / "data.parquet").height == 18
    # the same failing inputs again: the failed release is taken over and checked again, not copied
    with pytest.raises(ValuegateError, match="gate failed for release r/v0003"):
        _run(failing)
    assert [m["version"] for m in list_releases(root, "r")] == versions and _version_dirs(root) == versions
    assert read_current(root, "r") == "v0002" and _scores_runs(root) == [out["run_id"]]


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


@pytest.mark.parametrize("crash", ["report", "release"])
def test_resume_after_a_task_failure(prefect_harness, tmp_path, tiny_model_dir, monkeypatch, crash):
    """A late task crashes (the report once; or the release writer on every retry, before its manifest).
    The re-run with the same inputs takes up the version the failed run allocated, does not score again,
    and leaves one complete, current release: no second release, scores run, or ingested row."""
    from valuegate.storage import releases as rstore
    from valuegate.storage import samples as sstore
    from valuegate.storage.lance import Workspace
    from valuegate.tasks import report as report_mod
    from valuegate.tasks import score as score_mod

    calls = {"score": 0, "crash": True}
    real_score = score_mod.score_dataset

    def counted(*a, **k):
        calls["score"] += 1
        return real_score(*a, **k)

    monkeypatch.setattr(score_mod, "score_dataset", counted)
    if crash == "report":
        real_report = report_mod.write_report

        def flaky_report(*a, **k):
            if calls.pop("crash", False):
                raise RuntimeError("injected crash in the report")
            return real_report(*a, **k)

        monkeypatch.setattr(report_mod, "write_report", flaky_report)
    else:
        real_manifest = rstore._write_manifest

        def flaky_manifest(*a, **k):
            if calls["crash"]:  # every attempt of the retried task fails
                raise OSError("injected crash before the manifest")
            return real_manifest(*a, **k)

        monkeypatch.setattr(rstore, "_write_manifest", flaky_manifest)

    config = _config(tmp_path, tiny_model_dir())
    root = tmp_path / "ws"
    with pytest.raises((RuntimeError, OSError), match="injected crash"):
        _run(config)
    calls["crash"] = False
    assert rstore.read_current(root, "r") is None and calls["score"] == 1
    assert _version_dirs(root) == ["v0001"]
    assert not rstore.release_exists(root, "r", "v0001")  # complete only with its report (issue 15)

    out, _ = _run(config)
    assert out["version"] == "v0001" and out["resumed"] and out["current"]
    assert calls["score"] == 1 and {"extract", "score"} <= set(out["cached_steps"]) and out["timings"]["extract"] == 0
    assert rstore.read_current(root, "r") == "v0001"
    assert [m["version"] for m in rstore.list_releases(root, "r")] == ["v0001"] == _version_dirs(root)
    data = rstore.read_release_data(root, "r", "v0001", verify=True)
    assert data.height == 18 and data["id"].n_unique() == 18
    assert (rstore.release_dir(root, "r", "v0001") / "report.html").is_file()
    assert rstore.read_manifest(root, "r", "v0001")["run_id"] == out["run_id"]
    assert _scores_runs(root) == [out["run_id"]]
    members = sstore.read_members(Workspace(str(root)), "t").to_pylist()
    assert len(members) == 24 and len({(m["source"], m["row"]) for m in members}) == 24
    # the next run after a success, on the same inputs: nothing changed, no copy (still without scoring again)
    later, _ = _run(config)
    assert later["unchanged"] and later["version"] == "v0001" and not later["resumed"]
    assert calls["score"] == 1 and _version_dirs(root) == ["v0001"]


def test_changed_inputs_are_never_answered_from_the_cache(prefect_harness, tmp_path, tiny_model_dir):
    """New rows in a source, a changed score setting, a changed validation file: each recomputes what it
    changes; going back to earlier inputs may reuse the scores computed from exactly those inputs."""

    from valuegate.storage.releases import read_manifest

    model = tiny_model_dir()
    config = _config(tmp_path, model)
    root = tmp_path / "ws"
    first, _ = _run(config)
    train = tmp_path / "train.jsonl"
    original = train.read_text()
    extra = random_rows(4, seed=31)
    for r in extra:
        r["family"] = "a"
    train.write_text(original + "".join(json.dumps(r) + "\n" for r in extra))
    grown, _ = _run(config)
    assert grown["counts"]["new_samples"] == 4 and grown["counts"]["dataset_rows"] == 28
    assert grown["counts"]["extracted"] == 4 and grown["run_id"] != first["run_id"]
    assert not {"ingest", "extract", "score"} & set(grown["cached_steps"])
    renormed, _ = _run(_config(tmp_path, model, score={"normalize": "length"}))  # rewrites train.jsonl
    assert renormed["counts"]["dataset_rows"] == 24 and renormed["counts"]["left"] == 4
    assert renormed["run_id"] not in (first["run_id"], grown["run_id"])
    assert renormed["counts"]["extracted"] == 0
    assert "score" not in renormed["cached_steps"]
    # back to the first run's inputs exactly: its scores are reused
    config = _config(tmp_path, model)
    back, _ = _run(config)
    assert back["run_id"] == first["run_id"] and {"extract", "score"} <= set(back["cached_steps"])
    assert "ingest" in back["cached_steps"] or back["counts"]["new_samples"] == 0
    # a new validation file: a new version, scored against
    write_jsonl(tmp_path / "valid.jsonl", random_rows(5, seed=23))
    newval, _ = _run(config)
    assert newval["valset"] == "v@v2" and newval["run_id"] not in {first["run_id"], grown["run_id"]}
    assert "validation-set" not in newval["cached_steps"] and not {"extract", "score"} & set(newval["cached_steps"])
    assert read_manifest(root, "r", newval["version"])["valset"] == "v@v2"


def test_register_validation_set_flow(prefect_harness, tmp_path, tiny_model_dir):
    """The flow registers the next version (identical content: the existing one), says so in a markdown
    artifact, and is the step refresh runs (refresh scores against what it registered)."""

    from valuegate.flows.validation import register_validation_set
    from valuegate.storage.lance import Workspace
    from valuegate.storage.valsets import read_valset_versions

    ws = str(tmp_path / "ws")
    valid = write_jsonl(tmp_path / "held-out.jsonl", random_rows(6, seed=40))
    state = register_validation_set(name="held", file=str(valid), workspace=ws, return_state=True)
    first = state.result()
    assert first["valset"] == "held@v1" and first["rows"] == 6 and first["new"] is True
    md = _artifact(str(state.state_details.flow_run_id), "validation-set")
    assert "held@v1" in md and "| rows | 6 |" in md and "new version" in md
    same = register_validation_set(name="held", file=str(valid), workspace=ws)
    assert same["valset"] == "held@v1" and same["new"] is False
    assert same["content_hash"] == first["content_hash"]
    write_jsonl(valid, random_rows(7, seed=41))
    second = register_validation_set(name="held", file=str(valid), workspace=ws)
    assert second["valset"] == "held@v2" and second["rows"] == 7 and second["new"] is True
    assert [r["version"] for r in read_valset_versions(Workspace(ws), "held")] == [1, 2]
    with pytest.raises(ValuegateError, match="NAME"):
        register_validation_set(name="held@v1", file=str(valid), workspace=ws)
    # refresh with no validation file scores against the latest registered version
    config = _config(tmp_path, tiny_model_dir(), data={"valset": "held", "valset_file": None})
    out, _ = _run(config)
    assert out["valset"] == "held@v2"


def test_two_refresh_runs_at_once_on_one_workspace(prefect_harness, tmp_path, tiny_model_dir):
    from concurrent.futures import ThreadPoolExecutor

    from valuegate.flows.refresh import refresh
    from valuegate.storage import samples as sstore
    from valuegate.storage.lance import Workspace
    from valuegate.storage.releases import list_releases, read_current, read_manifest, read_release_data

    config = _config(tmp_path, tiny_model_dir())
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: refresh(config=config), range(2)))
    # two releases; or one, when a run reached the release after the other promoted: nothing changed since it
    written = sorted(o["version"] for o in outs if not o.get("unchanged"))
    assert written in (["v0001", "v0002"], ["v0001"]) and sorted(o["version"] for o in outs)[0] == "v0001"
    root = tmp_path / "ws"
    assert [m["version"] for m in list_releases(root, "r")] == written == _version_dirs(root)
    assert read_current(root, "r") in ("v0001", "v0002")
    for o in outs:  # complete, readable, matching their manifests
        assert read_release_data(root, "r", o["version"], verify=True).height == 18
        assert read_manifest(root, "r", o["version"])["run_id"] == o["run_id"]
    assert set(_scores_runs(root)) == {o["run_id"] for o in outs}
    ws = Workspace(str(root))
    members = sstore.read_members(ws, "t").to_pylist()
    assert len(members) == 24 and len({(m["source"], m["row"]) for m in members}) == 24


def test_rollback_and_diff_between_releases(prefect_harness, tmp_path, tiny_model_dir, capsys):
    """Two releases against two validation versions: the diff says what entered and left and why; a
    rollback makes the first current again; the next refresh writes a new release on top."""

    from valuegate.cli import main
    from valuegate.storage.releases import read_current
    from valuegate.tasks.release import diff_releases

    config = _config(tmp_path, tiny_model_dir())
    root = tmp_path / "ws"
    first, _ = _run(config)
    write_jsonl(tmp_path / "valid.jsonl", random_rows(5, seed=29))
    second, _ = _run(config)
    assert (first["version"], second["version"]) == ("v0001", "v0002") and second["valset"] == "v@v2"
    diff = diff_releases(root, "r", "v0001", "v0002")
    assert diff["valset"] == {"a": "v@v1", "b": "v@v2"} and diff["rows"] == {"a": 18, "b": 18}
    assert diff["entered"]["count"] == diff["left"]["count"]
    for side in ("entered", "left"):
        assert set(diff[side]["reasons"]) <= {"new validation version"}
    assert main(["release", "diff", "r", "v0001", "v0002", "--workspace", str(root)]) == 0
    assert "v0001" in capsys.readouterr().out
    assert main(["release", "rollback", "r", "--workspace", str(root)]) == 0
    assert read_current(root, "r") == "v0001" and "current is now v0001" in capsys.readouterr().out
    third, _ = _run(config)
    assert third["version"] == "v0003" and third["previous"] == "v0001" and not third["resumed"]
    assert third["run_id"] == second["run_id"] and read_current(root, "r") == "v0003"
