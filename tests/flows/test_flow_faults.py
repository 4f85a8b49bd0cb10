"""The refresh flow killed with SIGKILL at each step boundary and inside release/report/promote, then run
again: one complete current release, no orphan version (neither listed nor in the folder), every feature
row once. And promotions that interleave with another run's: CURRENT never moves back, each run reports
what it actually replaced.

The kill runs the flow in a child process (``python -c``, on the test harness's Prefect API) whose step
function is wrapped, by this test only, to ``os.kill(os.getpid(), SIGKILL)`` before or after calling
through: nothing in the product path knows about it. The re-run is an ordinary in-process run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from test_flow import _config, _run, _version_dirs
from test_runners import _feature_ids

# point → (module, attribute, "before" | "after" the call); an attribute "Class.method" wraps a method
KILL_POINTS = {
    "score": ("valuegate.tasks.score", "score_dataset", "after"),  # scores written, result not cached
    "allocate|gate": ("valuegate.tasks.gate", "run_gate", "before"),  # version allocated, nothing written
    "inside release": ("valuegate.storage.objstore", "Root.write_parquet", "after"),  # data.parquet only
    "inside report": ("valuegate.tasks.report", "write_report", "after"),  # report rendered, not copied in
    "report|promote": ("valuegate.storage.releases", "_write_manifest", "after"),  # complete, not current
    "inside promote": ("valuegate.storage.releases", "promote", "after"),  # CURRENT moved, run not finished
}

_KILLER = """
import importlib, os, signal, sys
module, attr, when, config = sys.argv[1:5]
owner = importlib.import_module(module)
cls_name, _, name = attr.rpartition(".")
target = getattr(owner, cls_name) if cls_name else owner
real = getattr(target, name)

def wrapped(*args, **kwargs):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(target, name, wrapped)
from valuegate.flows.refresh import refresh
refresh(config=config)
sys.exit(3)  # never reached: the wrapped step was not called
"""


def _run_killed(config: str, point: str, tmp_path) -> None:
    """Run the flow in a child process that SIGKILLs itself at ``point``; asserts it died that way."""
    from prefect.settings import PREFECT_API_URL

    module, attr, when = KILL_POINTS[point]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.run([sys.executable, "-c", _KILLER, module, attr, when, config], env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]


def _assert_one_complete_current(root, out: dict) -> list[str]:
    """The invariants after the re-run; returns the listed versions."""
    from valuegate.storage import releases as rstore

    listed = rstore.list_releases(root, "r")
    versions = [m["version"] for m in listed]
    assert versions == _version_dirs(root), "a version folder that is not a complete release"
    assert out["current"] and rstore.read_current(root, "r") == out["version"]
    for m in listed:  # every listed release is complete: data matches its manifest, the report is in it
        assert "report.html" in m["files"] and m["gate"]["passed"] is True
        vdir = rstore.release_dir(root, "r", m["version"])
        assert (vdir / "report.html").is_file() and (vdir / "gate").is_dir()
        assert rstore.read_release_data(root, "r", m["version"], verify=True).height == 18
        assert not [p for p in vdir.rglob("*") if p.name.endswith(".tmp")]
    ids = _feature_ids(root, out["model_fp"])
    assert len(ids) == len(set(ids)) == 29  # 24 training + 5 validation rows, each exactly once
    return versions


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun(prefect_harness, tmp_path, tiny_model_dir, point):
    from valuegate.storage import releases as rstore

    config = _config(tmp_path, tiny_model_dir())
    root = tmp_path / "ws"
    _run_killed(config, point, tmp_path)
    promoted = point == "inside promote"
    assert rstore.read_current(root, "r") == ("v0001" if promoted else None)
    if point not in ("report|promote", "inside promote"):  # nothing half-written is visible
        assert rstore.list_releases(root, "r") == []
        with pytest.raises(Exception, match="no complete release"):
            rstore.promote(root, "r", "v0001")
        from valuegate.tasks.release import rollback

        with pytest.raises(Exception, match="no complete release"):
            rollback(root, "r", to="v0001")

    out, _ = _run(config)
    versions = _assert_one_complete_current(root, out)
    if promoted:  # the killed run's release was current already, from the same inputs: nothing changed
        assert versions == ["v0001"] and out["unchanged"] and out["version"] == "v0001" and not out["resumed"]
    else:  # the version the killed run allocated (if any) is taken over, not left behind
        assert versions == ["v0001"] and out["previous"] is None
        assert out["resumed"] is (point != "score")


def test_interleaved_promotions_never_move_current_back(prefect_harness, tmp_path, tiny_model_dir,
                                                        monkeypatch):
    """Another run promotes while this one is between its allocation and its promotion: first an older
    version (this run replaces it, and says so), then a newer one (this run does not go back over it); then a
    person rolls back while this run is in its gate."""
    import polars as pl

    from valuegate.storage import releases as rstore
    from valuegate.tasks import gate as gate_mod
    from valuegate.tasks.release import build_manifest

    config = _config(tmp_path, tiny_model_dir())
    root = tmp_path / "ws"
    first, _ = _run(config)
    assert first["version"] == "v0001" and first["previous"] is None

    def other_release(version: str) -> None:
        """What a concurrent run writes and promotes: a complete, passed release ``version``."""
        fields = {"run_id": "other", "inputs": [{"source": "x", "sha256": "ab" * 32}], "model_fp": "f",
                  "valset": "v@v1", "policy": {}, "thresholds": {},
                  "gate": {"passed": True, "failures": []}, "counts": {}, "settings": {}}
        rstore.write_release(root, "r", version, pl.DataFrame({"id": ["a"], "value": [1.0]}),
                             build_manifest(name="r", version=version, **fields))
        rstore.promote(root, "r", version)

    # the other run allocated v0002 before this run's v0003, and promotes it while this run is in the gate
    real_allocate, real_gate = rstore.allocate_version, gate_mod.run_gate
    other: list[str] = []

    def allocate_after_other(r, name, **kwargs):
        other.append(real_allocate(r, name))
        return real_allocate(r, name, **kwargs)

    def gate_while_other_promotes(*a, **k):
        other_release(other[-1])
        return real_gate(*a, **k)

    monkeypatch.setattr(rstore, "allocate_version", allocate_after_other)
    monkeypatch.setattr(gate_mod, "run_gate", gate_while_other_promotes)
    # (each run below changes a gate bound: on the very inputs of the current release it would write nothing)
    out, _ = _run(_config(tmp_path, tiny_model_dir(), gate={"min_retained_fraction": 0.45}))
    assert (other, out["version"]) == (["v0002"], "v0003")
    assert out["current"] and out["previous"] == "v0002"  # what it replaced, not v0001 read at its start
    assert rstore.read_current(root, "r") == "v0003"

    # now the other run allocated v0005 after this run's v0004, and promotes it first
    def allocate_before_other(r, name, **kwargs):
        mine = real_allocate(r, name, **kwargs)
        other.append(real_allocate(r, name))
        return mine

    monkeypatch.setattr(rstore, "allocate_version", allocate_before_other)
    late, _ = _run(_config(tmp_path, tiny_model_dir(), gate={"min_retained_fraction": 0.4}))
    assert (other[-1], late["version"]) == ("v0005", "v0004")
    assert late["current"] is False and late["reason"] == "not promoted: newer release v0005 is current"
    assert rstore.read_current(root, "r") == "v0005"
    assert [m["version"] for m in rstore.list_releases(root, "r")] == [f"v000{i}" for i in range(1, 6)]

    # a person runs `valuegate release rollback r` while this run is in its gate (its v0006 allocated, not
    # complete): the rollback goes to the newest complete passed release before the current one, never to the
    # run's incomplete version; the run then promotes v0006 over the rolled-back one and says which it replaced
    from valuegate.tasks.release import rollback

    rolled: list[str] = []

    def gate_while_rolled_back(*a, **k):
        rolled.append(rollback(root, "r"))
        return real_gate(*a, **k)

    monkeypatch.setattr(rstore, "allocate_version", real_allocate)
    monkeypatch.setattr(gate_mod, "run_gate", gate_while_rolled_back)
    after, _ = _run(_config(tmp_path, tiny_model_dir(), gate={"min_retained_fraction": 0.35}))
    assert rolled == ["v0004"] and after["version"] == "v0006"
    assert after["current"] and after["previous"] == "v0004"
    assert rstore.read_current(root, "r") == "v0006"
