"""The allocate step's resume (tasks/allocate.py): a run takes over the version an earlier run with the same
inputs allocated only while that version is unfinished and no live run holds it, checked under its own claim."""

from __future__ import annotations

import polars as pl

from valuegate.settings import load_settings
from valuegate.storage import releases as store
from valuegate.storage.store import open_store
from valuegate.tasks import allocate
from valuegate.tasks.release import build_manifest


def test_a_version_promoted_while_a_run_waits_for_its_claim_is_not_resumed(tmp_path, monkeypatch):
    """Two runs of the same inputs (the later one's scores run answered from the cache, so the same run id):
    the earlier run finishes its release, promotes it and lets go of its claim between the later run's look at
    CURRENT and its claim. The later run must not take the promoted version over (both runs then reported
    v0001: the overlapping-runs test under load); it allocates its own."""
    ws = str(tmp_path / "ws")
    settings = load_settings(None, {"workspace": ws, "release": {"name": "r"}})
    root = open_store(ws)
    data = pl.DataFrame({"id": ["a", "b"], "value": [0.5, 0.1]})
    version = store.allocate_version(root, "r")  # the earlier run's release: complete, passed, not yet promoted
    manifest = build_manifest(name="r", version=version, run_id="run-1", inputs=[], model_fp="f" * 64,
                              valset="v@v1", policy={"policy": "keep_all"}, thresholds={},
                              gate={"passed": True, "failures": []}, counts={}, settings={"release": {"name": "r"}})
    store.write_release(root, "r", version, data, manifest, {}, scores=data)
    assert version == "v0001" and store.release_exists(root, "r", version) and store.read_current(root, "r") is None
    real_claim = allocate.claim

    def claim_after_the_other_run_promoted(s, version):
        if version == "v0001" and store.read_current(root, "r") is None:
            store.promote(root, "r", "v0001")  # the earlier run, done: promoted, its claim let go
        return real_claim(s, version)

    monkeypatch.setattr(allocate, "claim", claim_after_the_other_run_promoted)
    got = allocate.run(settings, "v0001", "run-1", "key")
    assert (got.version, got.resumed) == ("v0002", False), got
    assert store.read_current(root, "r") == "v0001"
    allocate.unclaim(settings, got.version)
