"""Nothing that deletes, moves or overwrites a file of the workspace follows a symbolic link out of it (issue 26).

Each test plants links to a directory of files outside the workspace (``outside``) wherever a code path
deletes or overwrites (an abandoned version, a file in one, a staging folder, ``releases/<name>`` itself,
``CURRENT``, the Data Docs copied into a release, the staging folders of the gate, card and report, the
run records under the results folder) and checks every outside file survives with its content. A link
met while cleaning is named in one warning and left alone; a write through one is one error line naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pytest

from valuegate.errors import ValuegateError
from valuegate.storage import releases as store
from valuegate.storage.objstore import open_root

NAME = "rel"
FILES = {"a.txt": "keep me", "sub/b.txt": "me too", "data.parquet": "not a release", ".x.tmp": "a dot file",
         "manifest.json.tmp": "x"}


def _outside(tmp_path: Path, label: str = "outside") -> Path:
    where = tmp_path / label
    for rel, text in FILES.items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_text(text)
    return where


def _intact(where: Path) -> None:
    got = {str(p.relative_to(where)): p.read_text() for p in where.rglob("*") if p.is_file()}
    assert got == FILES, f"files outside the workspace changed: {sorted(got)}"


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "ws" / "releases" / NAME
    base.mkdir(parents=True, exist_ok=True)
    return base


def _manifest_fields() -> dict:
    return {"run_id": "r", "gate": {"passed": True, "failures": []}, "counts": {}}


def test_a_link_as_a_version_is_named_once_and_left_alone(tmp_path):
    outside = _outside(tmp_path)
    base = _base(tmp_path)
    (base / "v0009").symlink_to(outside, target_is_directory=True)
    (base / "v0001").mkdir()
    (base / "v0001" / ".allocated").write_text("")
    (base / "v0001" / "data.parquet").write_text("partial")  # a real abandoned version: cleaned
    warned: list[str] = []
    cleaned = store.clean_abandoned(tmp_path / "ws", NAME, warn=warned.append)
    _intact(outside)
    assert cleaned == ["v0001"] and not (base / "v0001" / "data.parquet").exists()
    assert (base / "v0009").is_symlink()
    assert len(warned) == 1 and str(base / "v0009") in warned[0] and "symbolic link" in warned[0]
    # the next version goes past the link, and a second cleaning still deletes nothing through it
    assert store.allocate_version(tmp_path / "ws", NAME) == "v0010"
    store.clean_abandoned(tmp_path / "ws", NAME, warn=warned.append)
    _intact(outside)


def test_links_inside_a_version_and_as_staging_folders_are_left_alone(tmp_path):
    outside = _outside(tmp_path)
    target_file = outside / "a.txt"
    base = _base(tmp_path)
    (base / "v0002").mkdir()
    (base / "v0002" / ".allocated").write_text("")
    (base / "v0002" / "gate").symlink_to(outside, target_is_directory=True)
    (base / "v0002" / "data.parquet").symlink_to(target_file)
    (base / ".v0002-gate").symlink_to(outside, target_is_directory=True)
    (base / ".v0003-report").symlink_to(outside, target_is_directory=True)
    warned: list[str] = []
    store.clean_abandoned(tmp_path / "ws", NAME, warn=warned.append)
    _intact(outside)
    for link in ("v0002/gate", "v0002/data.parquet", ".v0002-gate", ".v0003-report"):
        assert (base / link).is_symlink()
        assert sum(str(base / link) in w for w in warned) == 1, warned


def test_a_linked_release_folder_is_not_cleaned_through(tmp_path):
    outside = _outside(tmp_path)
    (outside / "v0001").mkdir()
    (outside / "v0001" / "keep.txt").write_text("k")
    releases = tmp_path / "ws" / "releases"
    releases.mkdir(parents=True)
    (releases / NAME).symlink_to(outside, target_is_directory=True)
    warned: list[str] = []
    assert store.clean_abandoned(tmp_path / "ws", NAME, warn=warned.append) == []
    assert (outside / "v0001" / "keep.txt").read_text() == "k"
    (outside / "v0001" / "keep.txt").unlink()
    (outside / "v0001").rmdir()
    _intact(outside)
    assert len(warned) == 1 and str(releases / NAME) in warned[0]


def test_the_default_warning_is_logged(tmp_path, caplog):
    outside = _outside(tmp_path)
    (_base(tmp_path) / "v0004").symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="valuegate.storage.releases"):
        store.clean_abandoned(tmp_path / "ws", NAME)
    assert any("v0004 is a symbolic link" in r.getMessage() for r in caplog.records)
    _intact(outside)


def test_staging_writing_and_completing_a_release_through_a_link_is_refused(tmp_path):
    outside = _outside(tmp_path)
    base = _base(tmp_path)
    (base / "v0001").symlink_to(outside, target_is_directory=True)  # stale temporaries there: .x.tmp
    data = pl.DataFrame({"id": ["a"], "value": [1.0]})
    with pytest.raises(ValuegateError, match="v0001 is a symbolic link"):
        store.stage_release(tmp_path / "ws", NAME, "v0001", data, _manifest_fields())
    _intact(outside)
    # a real version whose Data Docs folder (copied in whole, replacing what is there) is a link
    (base / "v0002").mkdir()
    (base / "v0002" / "gate").symlink_to(outside, target_is_directory=True)
    docs = tmp_path / "docs"
    (docs / "index.html").parent.mkdir(parents=True)
    (docs / "index.html").write_text("<html>")
    with pytest.raises(ValuegateError, match="gate is a symbolic link"):
        store.stage_release(tmp_path / "ws", NAME, "v0002", data, _manifest_fields(), {"gate": docs})
    _intact(outside)
    # a file of the release that is a link to a file outside: never overwritten through
    (base / "v0003").mkdir()
    (base / "v0003" / "data.parquet").symlink_to(outside / "data.parquet")
    with pytest.raises(ValuegateError, match=r"data\.parquet is a symbolic link"):
        store.stage_release(tmp_path / "ws", NAME, "v0003", data, _manifest_fields())
    _intact(outside)


def test_current_and_its_lock_are_never_written_through_a_link(tmp_path):
    outside = _outside(tmp_path)
    ws = tmp_path / "ws"
    version = store.allocate_version(ws, NAME)
    store.write_release(ws, NAME, version, pl.DataFrame({"id": ["a"], "value": [1.0]}), _manifest_fields())
    base = _base(tmp_path)
    (base / "CURRENT").symlink_to(outside / "a.txt")
    with pytest.raises(ValuegateError, match="CURRENT is a symbolic link"):
        store.promote(ws, NAME, version)
    (base / "CURRENT").unlink()
    (base / ".CURRENT.lock").symlink_to(outside / "sub" / "b.txt")
    with pytest.raises(ValuegateError, match=r"CURRENT\.lock is a symbolic link"):
        store.promote(ws, NAME, version)
    _intact(outside)


def test_root_delete_and_write_refuse_a_link_on_the_way(tmp_path):
    outside = _outside(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "releases").symlink_to(outside, target_is_directory=True)
    r = open_root(ws)
    for call in (lambda: r.delete("releases/a.txt"), lambda: r.write_atomic("releases/a.txt", b"x"),
                 lambda: r.create("releases/new.txt", b"x"), lambda: r.copy_in(outside / "a.txt", "releases/c")):
        with pytest.raises(ValuegateError, match="releases is a symbolic link"):
            call()
    _intact(outside)


def test_staging_folders_of_gate_card_and_report_refuse_a_link(tmp_path):
    from valuegate.settings import Settings
    from valuegate.tasks.release import staging_dir

    outside = _outside(tmp_path)
    settings = Settings.model_validate({"workspace": str(tmp_path / "ws"), "release": {"name": NAME}})
    base = _base(tmp_path)
    for what in ("gate", "card", "report"):
        (base / f".v0001-{what}").symlink_to(outside, target_is_directory=True)
        with pytest.raises(ValuegateError, match=rf"\.v0001-{what} is a symbolic link"):
            staging_dir(settings, "v0001", what)
    assert staging_dir(settings, "v0002", "gate") == str(base / ".v0002-gate")
    _intact(outside)


def test_run_records_are_never_deleted_through_a_link(tmp_path):
    from valuegate.flows import results_dir
    from valuegate.flows.stale_runs import RUNS_DIR, crash_stale_runs

    outside = _outside(tmp_path)
    (outside / "old.json").write_text('{"flow_run_id": "x", "pid": 1, "host": "elsewhere"}')
    ws = tmp_path / "ws"
    ws.mkdir()
    base = results_dir(str(ws))
    base.mkdir(parents=True, exist_ok=True)
    (base / RUNS_DIR).symlink_to(outside, target_is_directory=True)
    lines: list[str] = []

    class Logger:
        def warning(self, line: str) -> None:
            lines.append(line)

    assert crash_stale_runs(str(ws), "this-run", Logger()) == []
    assert (outside / "old.json").exists()
    (outside / "old.json").unlink()
    _intact(outside)
    assert len(lines) == 1 and "symbolic link" in lines[0]
