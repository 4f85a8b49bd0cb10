"""Two runs registering the same validation file at once (an overlapping schedule and a manual run, on S3
seen as "tag 'v1' of table 'valset__v' already points at version 2, not 3"): the second waits for the
first's record and gets the same version back (issue 15, point 2)."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pyarrow as pa
import pytest
from tiny import random_rows, write_jsonl

from valuegate.errors import ValuegateError
from valuegate.storage import schemas
from valuegate.storage import valsets as store
from valuegate.storage.lance import Workspace
from valuegate.tasks import validation_set as tasks_valsets


def _claim_v1_as_another_run(ws: Workspace, path, name: str = "v") -> tuple[pa.Table, str]:
    """What the other run has done when this one starts: its rows written and tagged v1, not yet recorded."""
    rows = tasks_valsets.valset_rows(path, 10_000)
    table = schemas.valset_table(name)
    lance_version = ws.overwrite(table, rows.cast(schemas.valset_schema), schemas.valset_schema)
    ws.tag(table, "v1", lance_version)
    return rows, tasks_valsets.content_hash(rows)


def test_a_registration_racing_another_waits_for_its_record(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    path = write_jsonl(tmp_path / "valid.jsonl", random_rows(4, seed=5))
    rows, digest = _claim_v1_as_another_run(ws, path)

    def record_later() -> None:  # the other run appends its registry record a moment later
        time.sleep(1.0)
        ws.ensure(schemas.VALSET_VERSIONS, schemas.valset_versions_schema)
        record = {"name": "v", "version": 1, "lance_version": ws.version(schemas.valset_table("v")),
                  "content_hash": digest, "rows": rows.num_rows, "source": str(path),
                  "at": dt.datetime.now(dt.timezone.utc), "pruned": False}
        ws.append(schemas.VALSET_VERSIONS, pa.Table.from_pylist([record], schema=schemas.valset_versions_schema),
                  schemas.valset_versions_schema)

    other = threading.Thread(target=record_later)
    other.start()
    rec, new = tasks_valsets.register_valset(ws, "v", path, 10_000)
    other.join()
    assert (rec["version"], new) == (1, False)
    assert [r["version"] for r in store.read_valset_versions(ws, "v")] == [1]


def test_a_tag_whose_record_never_comes_is_one_clear_error(tmp_path, monkeypatch):
    ws = Workspace(str(tmp_path / "ws"))
    path = write_jsonl(tmp_path / "valid.jsonl", random_rows(4, seed=5))
    _claim_v1_as_another_run(ws, path)
    monkeypatch.setattr(tasks_valsets, "_REGISTER_WAIT_S", 1)
    with pytest.raises(ValuegateError, match="v1 is being registered by another run, and its record did not "
                                             "appear within 1 s"):
        tasks_valsets.register_valset(ws, "v", path, 10_000)
