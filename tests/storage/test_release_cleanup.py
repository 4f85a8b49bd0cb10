"""The next run cleans what killed runs left (issue 15, point 3): an incomplete version whose run is gone
(its claim lock free) loses every file but its ``.allocated`` marker, which keeps its number taken; its
hidden staging folders go too; a version whose claim a live process holds is left alone. On an object
store (where the claim lock, being local, says nothing about runs on other machines) only incomplete
versions older than a safety age are cleaned. And deterministic errors are never retried."""

from __future__ import annotations

import os
import subprocess
import sys

import polars as pl
import pytest
from test_flow import _config, _run
from test_release import NAME, _fields, _publish

from valuegate.errors import ValuegateError
from valuegate.flows import results_dir
from valuegate.storage import releases as store
from valuegate.storage.lance import Workspace
from valuegate.tasks.release import build_manifest

# a live run: holds the flock of one claim file until its stdin closes
_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def _plant(path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)


def _tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_next_run_cleans_abandoned_versions_keeps_their_numbers_and_spares_a_live_one(
        prefect_harness, tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir())
    base = tmp_path / "ws" / "releases" / "r"
    # v0001: killed while staging (inputs changed since, so never resumed): partial files, a temporary,
    # both staging folders
    _plant(base, {"v0001/.allocated": "", "v0001/data.parquet": "partial", "v0001/.scores.parquet.x.tmp": "",
                  "v0001/gate/index.html": "<html>", ".v0001-gate/index.html": "<html>",
                  ".v0001-report/report.html": "<html>"})
    # v0002: killed between its creation and its resume record: the marker, and the gate's staging folder
    _plant(base, {"v0002/.allocated": "", ".v0002-gate/index.html": "<html>"})
    # v0003: a live run's version, its claim held by another process
    live = {"v0003/.allocated": "", "v0003/data.parquet": "being written", ".v0003-gate/index.html": "<html>"}
    _plant(base, live)
    claim = results_dir(str(tmp_path / "ws")) / "release-claims" / "r-v0003.lock"
    claim.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(claim)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        summary, _ = _run(cfg)
        assert (sorted(p.name for p in (base / "v0003").iterdir()), (base / ".v0003-gate").is_dir()) == (
            [".allocated", "data.parquet"], True), "the live run's version was touched"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # numbers never reused: the new release comes after every allocated one
    assert (summary["version"], summary["current"], summary["resumed"]) == ("v0004", True, False)
    assert _tree(base / "v0001") == [".allocated"] and _tree(base / "v0002") == [".allocated"]
    left = sorted(p.name for p in base.iterdir() if p.name.startswith(".v"))
    assert left == [".v0003-gate"], left
    assert [m["version"] for m in store.list_releases(tmp_path / "ws", "r")] == ["v0004"]
    assert store.allocate_version(tmp_path / "ws", "r") == "v0005"


def test_clean_abandoned_on_local_disk_respects_claims_and_keep(tmp_path):
    import fcntl

    _publish(tmp_path, {"a": 1.0})
    base = store.release_dir(tmp_path, NAME, "v0001").parent
    for v in ("v0002", "v0003", "v0004"):
        assert store.allocate_version(tmp_path, NAME) == v
        _plant(base, {f"{v}/data.parquet": "partial", f".{v}-report/report.html": "<html>"})
    _plant(base, {".v0001-report/report.html": "<html>"})  # a complete release's leftover staging folder
    held: dict[str, int] = {}

    def claim(version: str) -> bool:
        fd = os.open(tmp_path / f"{version}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        held[version] = fd
        return True

    def unclaim(version: str) -> None:
        os.close(held.pop(version))

    assert claim("v0003")  # a live run of this process
    cleaned = store.clean_abandoned(tmp_path, NAME, keep=["v0004"], claim=claim, unclaim=unclaim)
    assert cleaned == ["v0001", "v0002"]
    assert _tree(base / "v0002") == [".allocated"]
    assert "data.parquet" in _tree(base / "v0003") and "data.parquet" in _tree(base / "v0004")
    assert sorted(p.name for p in base.iterdir() if p.name.startswith(".v")) == [".v0003-report", ".v0004-report"]
    assert store.read_release_data(tmp_path, NAME, "v0001")["id"].to_list() == ["a"]  # complete: untouched
    assert list(held) == ["v0003"]  # every claim it took, it dropped
    assert store.clean_abandoned(tmp_path, NAME, keep=["v0004"], claim=claim, unclaim=unclaim) == []
    assert store.allocate_version(tmp_path, NAME) == "v0005"


def test_clean_abandoned_on_s3_only_past_the_safety_age(s3_server):
    ws = Workspace(s3_server.make_bucket("vg-release-clean") + "/ws", s3_server.storage_options)
    _publish(ws, {"a": 1.0})
    v = store.allocate_version(ws, NAME)
    data = pl.DataFrame({"id": ["a", "b"], "value": [1.0, 2.0]})
    store.stage_release(ws, NAME, v, data, build_manifest(name=NAME, version=v, **_fields()), scores=data)
    client = s3_server.client()

    def keys() -> list[str]:
        found = client.list_objects_v2(Bucket="vg-release-clean", Prefix=f"ws/releases/{NAME}/{v}/")
        return sorted(o["Key"].rsplit("/", 1)[1] for o in found.get("Contents", []))

    assert keys() == [".allocated", "data.parquet", "scores.parquet"]
    assert store.clean_abandoned(ws, NAME) == []  # younger than the default safety age (an hour)
    assert keys() == [".allocated", "data.parquet", "scores.parquet"]
    assert store.clean_abandoned(ws, NAME, min_age_s=0) == [v]
    assert keys() == [".allocated"]
    assert store.read_current(ws, NAME) == "v0001" and store.allocate_version(ws, NAME) == "v0003"
    with pytest.raises(ValuegateError, match="no complete release"):
        store.read_manifest(ws, NAME, v)


# ---- deterministic errors are not retried ------------------------------------------------------------


def test_every_retried_task_skips_retries_on_user_errors():
    from prefect import Task

    from valuegate.flows import refresh as module
    from valuegate.flows.user_errors import retry_unless_user_error

    retried = {t.name: t.retry_condition_fn for t in vars(module).values() if isinstance(t, Task) and t.retries}
    assert {"ingest", "plan-shards", "extract-shard", "score-shard", "allocate", "release", "promote"} <= set(retried)
    assert all(fn is retry_unless_user_error for fn in retried.values()), retried


def test_a_user_error_in_a_retried_task_runs_once(prefect_harness, tiny_model_dir, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from valuegate.flows.refresh import promote_task
    from valuegate.settings import load_settings

    settings = load_settings(_config(tmp_path, tiny_model_dir()))

    @flow
    def promote_missing() -> dict:
        state = promote_task(settings, "v0009", return_state=True)  # retries=2: a ValuegateError is not retried
        try:
            state.result()
        except ValuegateError as exc:
            return {"error": str(exc), "task_run_id": state.state_details.task_run_id}
        return {"error": None}

    out = promote_missing()
    assert "no complete release r/v0009" in out["error"]
    with get_client(sync_client=True) as client:
        run = client.read_task_run(out["task_run_id"])
    assert (run.run_count, run.state.type.value) == (1, "FAILED")


def test_a_run_never_deletes_through_links_planted_in_its_releases(prefect_harness, tiny_model_dir, tmp_path):
    """Issue 26: ``ln -s /some/dir releases/r/v0009`` made the next run delete every file of /some/dir while
    it cleaned abandoned versions. Now each link is named in a warning and left alone; the run releases."""
    cfg = _config(tmp_path, tiny_model_dir())
    outside = tmp_path / "outside"
    keep = {"a.txt": "keep me", "sub/b.txt": "me too", "data.parquet": "not a release"}
    _plant(outside, keep)
    base = tmp_path / "ws" / "releases" / "r"
    _plant(base, {"v0002/.allocated": "", "v0002/data.parquet": "partial"})  # a real abandoned version
    (base / "v0009").symlink_to(outside, target_is_directory=True)
    (base / "v0002" / "gate").symlink_to(outside, target_is_directory=True)
    (base / ".v0003-report").symlink_to(outside, target_is_directory=True)
    out, _ = _run(cfg)
    assert out["version"] == "v0010" and out["current"]
    assert {str(p.relative_to(outside)): p.read_text() for p in outside.rglob("*") if p.is_file()} == keep
    assert all((base / link).is_symlink() for link in ("v0009", "v0002/gate", ".v0003-report"))
    assert not (base / "v0002" / "data.parquet").exists()  # the real abandoned version was still cleaned
    # the allocate step's warnings (logged by the run) name each link once
    from valuegate.settings import load_settings
    from valuegate.tasks import allocate

    res = allocate.run(load_settings(cfg), None, "another-run", "another-key")
    warned = [w for w in res.warnings if "symbolic link" in w]
    for link in ("v0009", "v0002/gate", ".v0003-report"):
        assert sum(str(base / link) in w for w in warned) == 1, warned
