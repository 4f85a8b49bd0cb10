"""Two and four `valuegate run` at once on one fresh workspace (local disk and the S3 test server), each in its
own process, as an overlapping schedule and a manual run would (issue 15, point 2).

Invariants: every feature row once per (id, fingerprint) and one registry row per fingerprint; every scores
run holds one row per (run_id, id); every run gets its own version; promotion only moves forward, so a
run that finishes after a newer release became current is not promoted (``current: False``, that newer
release as ``previous``); each promoted run saw what the others promoted before it (no two promoted runs
report the same ``previous``), and CURRENT ends on the newest release that passed its gate.
Kept small (16 rows, two batches of 8, which still overlap) so the three cases run in a few minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from tiny import run_config

from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace


def _config(tmp_path, model_dir, workspace: str) -> str:
    return run_config(tmp_path, model_dir, train=(16, 61), valid=(5, 62), families=True, workspace=workspace,
                      select={"policy": "top_fraction", "fraction": 0.75, "group_by": "family"},
                      gate={"min_retained_fraction": 0.5, "min_group_retention": 0.1})


def _summary(stdout: str) -> dict:
    """The JSON summary `valuegate run` prints last."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


@pytest.mark.parametrize(("where", "runs"), [("local", 2), ("local", 4), ("s3", 2)])
def test_concurrent_runs_keep_every_row_once_and_promote_in_order(tmp_path, tiny_model_dir, prefect_harness, where,
                                                                  runs, request):
    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    options = None
    if where == "local":
        uri = str(tmp_path / "ws")
    else:
        server = request.getfixturevalue("s3_server")
        uri = server.make_bucket(f"vg-runs-{uuid.uuid4().hex[:8]}") + "/ws"
        options = server.storage_options
        env.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": options["aws_access_key_id"],
                    "AWS_SECRET_ACCESS_KEY": options["aws_secret_access_key"],
                    "AWS_REGION": options["aws_region"]})
    config = _config(tmp_path, tiny_model_dir(), uri)
    procs = [subprocess.Popen([sys.executable, "-m", "valuegate.cli", "run", "--config", config, "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(runs)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summaries = [_summary(out) for out, _ in outs]

    # data kept exactly once (tasks/extract.py, storage/features.py)
    ws = Workspace(uri, options)
    sets = ws.read(schemas.FEATURE_SETS, columns=["model_fp"])["model_fp"].to_pylist()
    assert len(sets) == len(set(sets)), f"feature-set registry: {sets}"
    train_ids = set(sstore.dataset_ids(ws, "t"))
    assert len(train_ids) == 16
    for fp in set(sets):
        ids = ws.read(schemas.features_table(fp), columns=["id"])["id"].to_pylist()
        assert len(ids) == len(set(ids)), f"features {fp[:12]}: {len(ids)} rows for {len(set(ids))} ids"
    scores = ws.read(schemas.SCORES, columns=["run_id", "id"]).to_pylist()
    per_run: dict[str, list[str]] = {}
    for r in scores:
        per_run.setdefault(r["run_id"], []).append(r["id"])
    for run_id, ids in per_run.items():
        assert len(ids) == len(set(ids)) == 16 and set(ids) == train_ids, f"scores run {run_id}: {len(ids)} rows"
    assert {s["run_id"] for s in summaries} <= set(per_run)

    # releases (storage/releases.py): one version per run; promotion forward only: a run that lost the race
    # names the newer release that stays current; each promoted run saw the promotions before it;
    # CURRENT on the newest passed release
    from valuegate.storage import releases as rstore

    # a run that started only once another had promoted the same inputs (a loaded machine) finds nothing
    # changed and says so: it reports that release, writes none; every other run has its own version
    for s in summaries:
        if s.get("unchanged"):
            assert s["current"] and s["version"] == s["previous"], s
    versions = [s["version"] for s in summaries if not s.get("unchanged")]
    assert versions and len(set(versions)) == len(versions), f"versions {versions}"
    promoted = [s for s in summaries if s["current"] and not s.get("unchanged")]
    assert promoted, summaries
    previous = [s["previous"] for s in promoted]
    assert len(set(previous)) == len(promoted), f"two runs promoted over the same release: previous = {previous}"
    for s in summaries:
        if not s["current"]:
            assert s["previous"] > s["version"], s
            assert s["reason"] == f"not promoted: newer release {s['previous']} is current", s
    passed = [s["version"] for s in summaries if s["gate"]["passed"]]
    assert rstore.read_current(ws, "r") == max(passed), (rstore.read_current(ws, "r"), summaries)
