"""A release process killed with SIGKILL while it writes (real kills of a child process, nothing mocked in
the store): an incomplete version is never listed, read, promoted or rolled back to, and staging and
completing it again, whatever the kill left, completes it. And CURRENT never moves back by an ordinary
promotion (issue 15)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import polars as pl
import pytest
from test_release import NAME, _fields, _publish

from valuegate.errors import ValuegateError
from valuegate.storage import releases as store
from valuegate.tasks.release import build_manifest, publish_release, rollback

# the child: stage v0002 (data, scores, a gate folder), complete it with a report; killed at one point
_WRITER = """
import os, signal, sys
from pathlib import Path
import polars as pl
from valuegate.storage import objstore, releases as store
from valuegate.tasks.release import build_manifest
root, point, fields = sys.argv[1], sys.argv[2], eval(sys.argv[3])
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "data written":
    real = objstore.Root.write_parquet
    def write_parquet(self, key, *a, **k):
        out = real(self, key, *a, **k)
        kill()
    objstore.Root.write_parquet = write_parquet
elif point == "report copied":
    real_manifest = store._write_manifest
    store._write_manifest = lambda *a, **k: kill()
elif point == "manifest torn":  # the manifest's temporary file is written, the rename never happens
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith("manifest.json"):
            kill()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
docs, report = Path(root) / "docs", Path(root) / "report.html"
docs.mkdir(exist_ok=True)
(docs / "index.html").write_text("<html>gate</html>")
report.write_text("<html>report</html>")
data = pl.DataFrame({"id": ["a", "b"], "value": [1.0, 2.0]})
record = store.stage_release(root, "demo", "v0002", data, build_manifest(name="demo", version="v0002", **fields),
                             {"gate": docs}, scores=data)
store.complete_release(root, "demo", "v0002", record, {"report.html": report})
sys.exit(3)
"""


@pytest.mark.parametrize("point", ["data written", "report copied", "manifest torn"])
def test_sigkill_while_writing_leaves_nothing_visible(tmp_path, point):
    _publish(tmp_path, {"a": 1.0})
    assert store.allocate_version(tmp_path, NAME) == "v0002"
    child = subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path), point, repr(_fields())],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    vdir = store.release_dir(tmp_path, NAME, "v0002")
    left = sorted(p.name for p in vdir.iterdir())
    assert "manifest.json" not in left and "data.parquet" in left
    if point == "report copied":  # every file but the manifest
        assert {"data.parquet", "scores.parquet", "gate", "report.html"} <= set(left)
    if point == "manifest torn":
        assert any(n.startswith(".manifest.json.") and n.endswith(".tmp") for n in left)
    # incomplete: not listed, not readable, never current (neither by promotion nor by a rollback)
    assert [m["version"] for m in store.list_releases(tmp_path, NAME)] == ["v0001"]
    assert not store.release_exists(tmp_path, NAME, "v0002")
    for attempt in (lambda: store.promote(tmp_path, NAME, "v0002"),
                    lambda: rollback(tmp_path, NAME, to="v0002"),
                    lambda: store.read_release_data(tmp_path, NAME, "v0002")):
        with pytest.raises(ValuegateError, match="no complete release"):
            attempt()
    assert store.read_current(tmp_path, NAME) == "v0001"
    # staging and completing the same version again completes it, whatever the kill left
    data = pl.DataFrame({"id": ["a", "b"], "value": [1.0, 2.0]})
    report = tmp_path / "report.html"
    report.write_text("<html>report</html>")
    record = store.stage_release(tmp_path, NAME, "v0002", data,
                                 build_manifest(name=NAME, version="v0002", **_fields()), scores=data)
    store.complete_release(tmp_path, NAME, "v0002", record, {"report.html": report})
    assert not [n for n in os.listdir(vdir) if n.endswith(".tmp")]
    m = store.read_manifest(tmp_path, NAME, "v0002")
    assert m["files"] == ["report.html"] and store.read_release_data(tmp_path, NAME, "v0002", verify=True).equals(data)
    assert store.promote(tmp_path, NAME, "v0002") == "v0001"


def test_complete_release_checks_what_was_staged(tmp_path):
    data = pl.DataFrame({"id": ["a"], "value": [1.0]})
    v = store.allocate_version(tmp_path, NAME)
    record = store.stage_release(tmp_path, NAME, v, data, build_manifest(name=NAME, version=v, **_fields()))
    with pytest.raises(ValuegateError, match="completion record is for demo/v0001, not demo/v0002"):
        store.complete_release(tmp_path, NAME, "v0002", record)
    # the staged data changed after its record was taken (another attempt restaged): refused, not vouched for
    store.stage_release(tmp_path, NAME, v, data.with_columns(value=pl.lit(2.0)),
                        build_manifest(name=NAME, version=v, **_fields()))
    with pytest.raises(ValuegateError, match="does not match its record; stage the release again"):
        store.complete_release(tmp_path, NAME, v, record)
    assert not store.release_exists(tmp_path, NAME, v)
    with pytest.raises(ValuegateError, match="does not exist"):
        store.complete_release(tmp_path, NAME, v, record, {"report.html": tmp_path / "missing.html"})


def _write(root, version: str) -> None:
    data = pl.DataFrame({"id": [version], "value": [1.0]})
    store.write_release(root, NAME, version, data, build_manifest(name=NAME, version=version, **_fields()))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_promotion_never_moves_current_back(where, tmp_path, request):
    """Two runs allocated v0001 and v0002 and finish out of order: v0002 is promoted first, then v0001's
    ordinary promotion is refused (CURRENT stays on the newest); a rollback is the explicit way back."""
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        from valuegate.storage.lance import Workspace

        root = Workspace(server.make_bucket("vg-forward") + "/ws", server.storage_options)
    else:
        root = str(tmp_path)
    first, second = store.allocate_version(root, NAME), store.allocate_version(root, NAME)
    _write(root, first)
    _write(root, second)
    assert store.promote(root, NAME, second) is None
    with pytest.raises(store.NewerIsCurrent, match="not promoted: newer release v0002 is current") as info:
        store.promote(root, NAME, first)
    assert info.value.current == "v0002" and info.value.reason == "not promoted: newer release v0002 is current"
    rec = store.read_current_record(root, NAME)
    assert rec == {"version": "v0002", "promotion": 1}
    assert store.promote(root, NAME, second) == "v0002"  # already current: nothing moves
    assert store.read_current_record(root, NAME) == rec
    assert rollback(root, NAME, to=first) == "v0001" and store.read_current(root, NAME) == "v0001"
    assert store.promote(root, NAME, second) == "v0001"  # forward again, by an ordinary promotion


def test_publish_reports_what_it_replaced(tmp_path, monkeypatch):
    """publish_release takes ``previous`` from its own promotion: another publisher's promotion between its
    write and its promotion is what it replaced; a newer one makes it say it was not promoted."""
    real_write = store.write_release
    other: list[str] = []

    def write_then_other_promotes(root, name, version, *a, **k):
        out = real_write(root, name, version, *a, **k)
        if other and not store.release_exists(root, name, other[-1]):
            _write(root, other[-1])
            store.promote(root, name, other[-1])
        return out

    monkeypatch.setattr(store, "write_release", write_then_other_promotes)
    assert _publish(tmp_path, {"a": 1.0})["previous"] is None
    other.append(store.allocate_version(tmp_path, NAME))  # v0002, allocated before this publisher's v0003
    out = publish_release(tmp_path, NAME, pl.DataFrame({"id": ["b"], "value": [1.0]}), **_fields())
    assert out == {"version": "v0003", "current": True, "previous": "v0002"}
    real_allocate = store.allocate_version

    def allocate_before_other(root, name):
        mine = real_allocate(root, name)
        other.append(real_allocate(root, name))  # v0005, promoted before this publisher's v0004
        return mine

    monkeypatch.setattr(store, "allocate_version", allocate_before_other)
    late = publish_release(tmp_path, NAME, pl.DataFrame({"id": ["c"], "value": [1.0]}), **_fields())
    assert late == {"version": "v0004", "current": False, "previous": "v0005",
                    "reason": "not promoted: newer release v0005 is current"}
    assert store.read_current(tmp_path, NAME) == "v0005"
