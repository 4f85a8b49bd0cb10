"""Releases: versioned directories, the manifest as completion record, atomic CURRENT, rollback, diff."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp

import polars as pl
import pyarrow.parquet as pq
import pytest

from valuegate.digests import sha256_file
from valuegate.errors import ValuegateError
from valuegate.storage import releases as store
from valuegate.tasks.release import (
    build_manifest,
    diff_releases,
    format_diff,
    publish_release,
    release_summary,
    rollback,
)

NAME = "demo"


def _fields(passed: bool = True, valset: str = "grammars@v1", policy: str = "drop_negative",
            scored: int = 0) -> dict:
    return {"run_id": "run-1", "inputs": [{"source": "/data/train.jsonl", "sha256": "ab" * 32}],
            "model_fp": "f" * 64, "valset": valset,
            "policy": {"policy": policy, "aggregate": "mean", "fraction": 0.8, "threshold": 0.0},
            "thresholds": {"min_retained_fraction": 0.5},
            "gate": {"passed": passed, "failures": [] if passed else ["retained 0.1 < 0.5"]},
            "counts": {"scored": scored}, "settings": {"release": {"name": NAME}}}


def _scores(values: dict[str, float]) -> pl.DataFrame:
    return pl.DataFrame({"id": list(values), "value": list(values.values())})


def _kept(scores: pl.DataFrame) -> pl.DataFrame:
    """drop_negative over ``scores``, with a content column like a real release."""
    return scores.filter(pl.col("value") >= 0).with_columns(prompt=pl.lit("p ") + pl.col("id"))


def _publish(root, values: dict[str, float], **kw) -> dict:
    scores = _scores(values)
    return publish_release(root, NAME, _kept(scores), scores=scores, **_fields(scored=scores.height, **kw))


def test_write_promote_read_current(tmp_path):
    data = pl.DataFrame({"id": ["a", "b"], "value": [0.5, 0.1], "prompt": ["x", "y"]})
    version = store.allocate_version(tmp_path, NAME)
    assert version == "v0001"
    assert store.release_dir(tmp_path, NAME, version).is_dir()
    assert store.releases_uri(tmp_path, NAME) == str(tmp_path / "releases" / NAME)
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "index.html").write_text("<html>gate</html>")
    report = tmp_path / "report.html"
    report.write_text("<html>report</html>")
    manifest = build_manifest(name=NAME, version=version, **_fields(scored=3))
    rdir = store.write_release(tmp_path, NAME, version, data, manifest, {"gate": docs, "report.html": report})
    assert store.release_exists(tmp_path, NAME, version)
    assert store.read_current(tmp_path, NAME) is None
    assert store.promote(tmp_path, NAME, version) is None
    assert store.read_current(tmp_path, NAME) == version
    assert (rdir / "gate" / "sub" / "index.html").read_text() == "<html>gate</html>"
    assert (rdir / "report.html").read_text() == "<html>report</html>"
    m = store.read_manifest(tmp_path, NAME, version)
    assert m["data_rows"] == 2 and m["files"] == ["gate", "report.html"] and m["created"].endswith("+00:00")
    assert m["data_sha256"] == sha256_file(rdir / "data.parquet")
    assert store.read_release_data(tmp_path, NAME, version, verify=True).equals(data)
    [listed] = store.list_releases(tmp_path, NAME)
    assert listed["version"] == version and listed["current"] is True
    assert store.list_release_names(tmp_path) == [NAME]
    assert release_summary(listed).startswith("* v0001") and "passed" in release_summary(listed)
    # releases are immutable
    with pytest.raises(ValuegateError, match="immutable"):
        store.write_release(tmp_path, NAME, version, data, manifest)
    # no temporaries left behind
    assert not [p for p in rdir.parent.rglob(".*") if p.name.endswith(".tmp")]


def test_failed_gate_is_written_but_never_current(tmp_path):
    first = _publish(tmp_path, {"a": 1.0, "b": 0.5})
    failed = _publish(tmp_path, {"a": 1.0, "b": -0.5}, passed=False)
    assert first == {"version": "v0001", "current": True, "previous": None}
    assert failed == {"version": "v0002", "current": False, "previous": "v0001"}
    assert store.release_exists(tmp_path, NAME, "v0002")
    with pytest.raises(ValuegateError, match="did not pass its gate"):
        store.promote(tmp_path, NAME, "v0002")
    assert store.read_current(tmp_path, NAME) == "v0001"
    listed = store.list_releases(tmp_path, NAME)
    assert [(r["version"], r["current"]) for r in listed] == [("v0001", True), ("v0002", False)]
    assert "FAILED (1 check)" in release_summary(listed[1])
    with pytest.raises(ValuegateError, match="did not pass"):
        rollback(tmp_path, NAME, to="v0002")


def _allocate_many(root: str, barrier, queue, n: int) -> None:
    """Spawned worker: wait for the others, then allocate ``n`` versions as fast as possible."""
    barrier.wait()
    queue.put([store.allocate_version(root, NAME) for _ in range(n)])


def test_concurrent_allocation_never_collides(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(str(tmp_path), barrier, queue, 6)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        versions = [v for _ in procs for v in queue.get(timeout=60)]
    finally:
        for p in procs:
            p.join(timeout=10)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(versions) == [store.format_version(i) for i in range(1, 25)]


def test_allocation_retries_on_collision(tmp_path, monkeypatch):
    for v in ("v0001", "v0002"):
        (tmp_path / "releases" / NAME / v).mkdir(parents=True)
    calls = []
    real = store._version_numbers

    def stale_first(root, name):  # the first listing misses both directories (another run made them)
        calls.append(1)
        return [] if len(calls) == 1 else real(root, name)

    monkeypatch.setattr(store, "_version_numbers", stale_first)
    assert store.allocate_version(tmp_path, NAME) == "v0003"


def test_rollback_previous_and_explicit(tmp_path):
    _publish(tmp_path, {"a": 1.0})
    _publish(tmp_path, {"a": 1.0, "b": 1.0})
    _publish(tmp_path, {"a": 1.0, "b": 1.0, "c": 1.0}, passed=False)
    _publish(tmp_path, {"a": 1.0, "b": 1.0, "d": 1.0})
    assert store.read_current(tmp_path, NAME) == "v0004"
    assert rollback(tmp_path, NAME) == "v0002"  # skips the failed v0003
    assert rollback(tmp_path, NAME) == "v0001"
    with pytest.raises(ValuegateError, match="nothing to roll back to"):
        rollback(tmp_path, NAME)
    assert store.read_current(tmp_path, NAME) == "v0001"
    assert rollback(tmp_path, NAME, to="4") == "v0004"
    assert store.read_current(tmp_path, NAME) == "v0004"
    with pytest.raises(ValuegateError, match="no complete release"):
        rollback(tmp_path, NAME, to="v0009")
    with pytest.raises(ValuegateError, match="no release named"):
        rollback(tmp_path, "other")


def test_diff_gives_each_reason(tmp_path):
    # a: x, y, z kept; w dropped (negative).
    _publish(tmp_path, {"x": 1.0, "y": 0.2, "z": 0.3, "w": -0.4})
    # b, same valset: new sample n enters (new data); w enters, y leaves (value change); z left the dataset.
    _publish(tmp_path, {"x": 1.0, "y": -0.1, "w": 0.6, "n": 0.9})
    # c, new valset: x leaves, y enters.
    _publish(tmp_path, {"x": -1.0, "y": 0.5, "w": 0.6, "n": 0.9}, valset="grammars@v2")
    d = diff_releases(tmp_path, NAME, "v0001", "v0002")
    assert d["rows"] == {"a": 3, "b": 3} and d["cutoff"] == {"a": 0.0, "b": 0.0}
    ent, left = d["entered"], d["left"]
    assert ent["count"] == 2 and left["count"] == 2
    assert ent["reasons"]["new data"] == {"count": 1, "examples": [
        {"id": "n", "old_value": None, "new_value": 0.9}]}
    assert ent["reasons"]["value change"]["examples"] == [{"id": "w", "old_value": -0.4, "new_value": 0.6}]
    assert left["reasons"]["value change"]["examples"] == [{"id": "y", "old_value": 0.2, "new_value": -0.1}]
    assert left["reasons"]["new data"]["examples"] == [{"id": "z", "old_value": 0.3, "new_value": None}]
    d2 = diff_releases(tmp_path, NAME, "v0002", "v0003", examples=1)
    assert set(d2["entered"]["reasons"]) == {"new validation version"}
    assert d2["entered"]["reasons"]["new validation version"]["examples"][0]["id"] == "y"
    assert d2["left"]["reasons"]["new validation version"]["examples"] == [
        {"id": "x", "old_value": 1.0, "new_value": -1.0}]
    text = format_diff(d2)
    assert "grammars@v1 → grammars@v2" in text and "new validation version: 1" in text
    # a release without the scores of its run: the reason is unknown, not guessed
    data = pl.DataFrame({"id": ["q"], "value": [0.1]})
    v = store.allocate_version(tmp_path, NAME)
    store.write_release(tmp_path, NAME, v, data, build_manifest(name=NAME, version=v, **_fields()))
    d3 = diff_releases(tmp_path, NAME, "v0003", v)
    assert d3["entered"]["reasons"]["new data"]["count"] == 1  # v0003's scores say q was not scored there
    assert d3["left"]["reasons"]["unknown"]["count"] == 3  # v0004 cannot say whether it scored y, w, n
    assert json.dumps(d3)  # JSON-able for the CLI's --json


def test_diff_of_suspect_releases_reads_the_suspect_score(tmp_path):
    """Both releases select by the suspect score: the diff compares it (not the value) and its threshold."""
    def publish(suspect: dict[str, float]) -> None:
        scores = pl.DataFrame({"id": list(suspect), "value": [0.1] * len(suspect), "suspect": list(suspect.values())})
        kept = scores.filter(pl.col("suspect") <= 2.0).with_columns(prompt=pl.lit("p"))
        fields = _fields(scored=scores.height, policy="suspect")
        fields["policy"]["suspect_threshold"] = 2.0
        publish_release(tmp_path, NAME, kept, scores=scores, **fields)

    publish({"x": 0.5, "y": 1.9, "z": 3.5})
    publish({"x": 0.4, "y": 2.6, "z": 1.0})
    assert store.read_release_scores(tmp_path, NAME, "v0002").columns == ["id", "value", "suspect", "kept"]
    d = diff_releases(tmp_path, NAME, "v0001", "v0002")
    assert d["measure"] == "suspect" and d["cutoff"] == {"a": 2.0, "b": 2.0}
    assert d["entered"]["reasons"] == {"suspect change": {"count": 1, "examples": [
        {"id": "z", "old_value": 3.5, "new_value": 1.0}]}}
    assert d["left"]["reasons"]["suspect change"]["examples"] == [{"id": "y", "old_value": 1.9, "new_value": 2.6}]
    assert "cut-off (suspect): 2" in format_diff(d) and "suspect change: 1" in format_diff(d)


def test_data_parquet_is_plain(tmp_path):
    data = pl.DataFrame({
        "id": ["a", "b", "c"], "value": [0.5, 0.25, None],
        "kind": pl.Series(["pr", "chat", "pr"], dtype=pl.Categorical),
        "messages": [[{"role": "user", "content": "hi"}], [], None],
        "nearest_ids": [["v1", "v2"], ["v3"], []],
        "n_tokens": pl.Series([3, 4, 5], dtype=pl.Int32),
        "vec": pl.Series([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=pl.Array(pl.Float32, 2)),
        "at": pl.Series([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * 3),
    })
    v = store.allocate_version(tmp_path, NAME)
    rdir = store.write_release(tmp_path, NAME, v, data, build_manifest(name=NAME, version=v, **_fields()))
    back = store.read_release_data(tmp_path, NAME, v)
    assert back.equals(data.with_columns(pl.col("kind").cast(pl.String)))
    schema = pq.read_schema(rdir / "data.parquet")
    assert all(not any(w in str(f.type) for w in ("view", "dictionary", "large")) for f in schema)
    assert not any(f.metadata for f in schema)
    assert pl.read_parquet(rdir / "data.parquet").height == 3


def test_data_parquet_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = pl.DataFrame({"id": ["a", "b"], "value": [0.5, 0.25], "nearest_ids": [["v1"], []]})
    v = store.allocate_version(tmp_path, NAME)
    rdir = store.write_release(tmp_path, NAME, v, data, build_manifest(name=NAME, version=v, **_fields()))
    ds = datasets.load_dataset("parquet", data_files=str(rdir / "data.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds["id"] == ["a", "b"] and ds["nearest_ids"] == [["v1"], []]


def test_crash_before_manifest_is_never_current(tmp_path, monkeypatch):
    _publish(tmp_path, {"a": 1.0})
    v = store.allocate_version(tmp_path, NAME)
    manifest = build_manifest(name=NAME, version=v, **_fields())
    data = pl.DataFrame({"id": ["a", "b"], "value": [1.0, 2.0]})

    def crash(rdir, payload):
        raise RuntimeError("power loss")

    monkeypatch.setattr(store, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="power loss"):
        store.write_release(tmp_path, NAME, v, data, manifest)
    monkeypatch.undo()
    assert (store.release_dir(tmp_path, NAME, v) / "data.parquet").is_file()
    assert not store.release_exists(tmp_path, NAME, v)
    assert [r["version"] for r in store.list_releases(tmp_path, NAME)] == ["v0001"]
    with pytest.raises(ValuegateError, match="no complete release"):
        store.promote(tmp_path, NAME, v)
    with pytest.raises(ValuegateError, match="no complete release"):
        store.read_release_data(tmp_path, NAME, v)
    assert store.read_current(tmp_path, NAME) == "v0001"
    assert store.allocate_version(tmp_path, NAME) == "v0003"  # the crashed number is not reused
    # a retry of the same write completes the crashed release
    store.write_release(tmp_path, NAME, v, data, manifest)
    store.promote(tmp_path, NAME, v)
    assert store.read_current(tmp_path, NAME) == v


def test_user_errors(tmp_path):
    v = store.allocate_version(tmp_path, NAME)
    m = build_manifest(name=NAME, version=v, **_fields())
    with pytest.raises(ValuegateError, match="'value' column"):
        store.write_release(tmp_path, NAME, v, pl.DataFrame({"id": ["a"]}), m)
    with pytest.raises(ValuegateError, match="duplicate ids"):
        store.write_release(tmp_path, NAME, v, pl.DataFrame({"id": ["a", "a"], "value": [1.0, 2.0]}), m)
    with pytest.raises(ValuegateError, match="extra release file"):
        store.write_release(tmp_path, NAME, v, pl.DataFrame({"id": ["a"], "value": [1.0]}), m,
                            {"../escape": tmp_path})
    with pytest.raises(ValuegateError, match="release name"):
        store.allocate_version(tmp_path, "../x")
    with pytest.raises(ValuegateError, match="not supported"):
        store.allocate_version("gs://bucket/ws", NAME)
    with pytest.raises(ValuegateError, match="sha256"):
        build_manifest(name=NAME, version=v, **{**_fields(), "inputs": [{"source": "x"}]})
    assert not store.release_exists(tmp_path, NAME, v)
