"""Property-based tests of ingestion (hypothesis, issue 15): arbitrary bytes as JSON lines, arbitrary JSON
values per field, and arbitrary Arrow column types in Parquet and text in CSV never crash ``ingest_file``.

Every example ingests into a fresh workspace (a temporary folder per example: hypothesis reuses a
function-scoped fixture across examples). The one error allowed is a :class:`ValuegateError` for a file
that is unusable as a whole (no sample fields, unreadable), one line naming the file. Otherwise every
row ends in ``members`` or in ``quarantine`` with a reason, and the counts of the report add up.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valuegate.errors import ValuegateError
from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace
from valuegate.tasks.ingest import ingest_file

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)
SAMPLE_FIELDS = ["prompt", "response", "messages", "text", "images"]


def _check_ingest(write) -> None:
    """Write a source with ``write(folder) -> path`` in a fresh folder, ingest it, check the invariants."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp))
        ws = Workspace(str(Path(tmp) / "ws"))
        sstore.ensure_sample_tables(ws)
        try:
            rep = ingest_file(ws, "d", path, max_chars=2_000)
        except ValuegateError as exc:  # the whole file is unusable: one line that names it
            msg = str(exc)
            assert "\n" not in msg and str(path) in msg, msg
            assert ws.count(schemas.MEMBERS) == 0 and ws.count(schemas.QUARANTINE) == 0
            return
        members = sstore.read_members(ws, "d").to_pylist()
        quarantine = sstore.read_quarantine(ws, "d").to_pylist()
        kept_rows = [m["row"] for m in members]
        refused_rows = [q["row"] for q in quarantine]
        assert sorted(kept_rows + refused_rows) == list(range(rep.rows))  # each row once, in one place
        assert rep.rows == rep.kept + rep.quarantined
        assert (rep.kept, rep.quarantined) == (len(members), len(quarantine))
        assert all(q["reason"] for q in quarantine)
        assert sum((rep.reasons or {}).values()) == rep.quarantined
        ids = {m["id"] for m in members}
        assert rep.new_samples == len(ids) == ws.count(schemas.SAMPLES)
        assert rep.duplicates == rep.kept - len(ids)
        for m in members:
            json.loads(m["metadata"])  # stored metadata is JSON


# ---- JSON lines ------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
TURN = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "bot"]) | JSON,
                              "content": st.text(max_size=8) | JSON})
FIELD_VALUE = {
    "prompt": st.text(max_size=10) | JSON, "response": st.text(max_size=10) | JSON,
    "text": st.text(max_size=10) | JSON, "messages": st.lists(TURN, max_size=3) | JSON,
    "images": st.none() | st.just([]) | st.lists(st.text(max_size=6), max_size=2) | JSON,
}
RECORD = st.fixed_dictionaries({}, optional={**FIELD_VALUE, "tag": JSON, "n": JSON})


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


@PROPERTY
@given(st.lists(st.binary(max_size=40) | RECORD.map(_line), max_size=6), st.booleans())
def test_arbitrary_bytes_as_json_lines_never_crash_ingest(lines, bom):
    def write(folder: Path) -> Path:
        path = folder / "src.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines))
        return path

    _check_ingest(write)


@PROPERTY
@given(st.lists(RECORD, min_size=1, max_size=6))
def test_arbitrary_json_values_per_field_never_crash_ingest(records):
    def write(folder: Path) -> Path:
        path = folder / "src.jsonl"
        path.write_bytes(b"".join(_line(r) + b"\n" for r in records))
        return path

    _check_ingest(write)


# ---- Parquet: arbitrary Arrow column types ---------------------------------------------------------

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
COLUMN_TYPES: list[tuple[pa.DataType, st.SearchStrategy]] = [
    (pa.string(), st.text(max_size=8)),
    (pa.large_string(), st.text(max_size=8)),
    (pa.int64(), st.integers(-2**63, 2**63 - 1)),
    (pa.float64(), st.floats()),
    (pa.bool_(), st.booleans()),
    (pa.binary(), st.binary(max_size=8)),
    (pa.timestamp("us", tz="UTC"), st.datetimes(timezones=st.just(dt.timezone.utc))),
    (pa.timestamp("ns"), st.integers(-2**62, 2**62)),
    (pa.date32(), st.dates()),
    (pa.time64("us"), st.times()),
    (pa.duration("s"), st.integers(-2**40, 2**40)),
    (pa.decimal128(10, 2), st.decimals(min_value=-10**7, max_value=10**7, places=2)),
    (pa.list_(pa.int32()), st.lists(st.integers(-2**31, 2**31 - 1), max_size=3)),
    (pa.struct([("a", pa.string()), ("b", pa.int64())]),
     st.fixed_dictionaries({"a": st.none() | st.text(max_size=4), "b": st.none() | st.integers(0, 9)})),
    (pa.map_(pa.string(), pa.int64()), st.lists(st.tuples(st.text(max_size=3), st.integers(0, 9)), max_size=2)),
    (MESSAGE_TYPE, st.lists(st.fixed_dictionaries({
        "role": st.none() | st.sampled_from(["user", "assistant", "system", "robot"]),
        "content": st.none() | st.text(max_size=6)}), max_size=3)),
    (pa.null(), st.none()),
]


@st.composite
def arrow_tables(draw) -> pa.Table:
    n = draw(st.integers(1, 5))
    shape = draw(st.sampled_from([["prompt", "response"], ["messages"], ["text"], ["prompt"], []]))
    names = shape + draw(st.lists(st.sampled_from(["x", "y", "z", "images"]), unique=True, max_size=3))
    cols = {}
    for name in names:
        t, values = draw(st.sampled_from(COLUMN_TYPES))
        cols[name] = pa.array(draw(st.lists(st.none() | values, min_size=n, max_size=n)), type=t)
    return pa.table(cols) if cols else pa.table({"x": pa.array([None] * n, pa.null())})


@PROPERTY
@given(arrow_tables())
def test_arbitrary_column_types_in_parquet_never_crash_ingest(table):
    def write(folder: Path) -> Path:
        path = folder / "src.parquet"
        pq.write_table(table, path)
        return path

    _check_ingest(write)


def test_an_images_column_of_another_type_is_kept_as_hashes():
    """Found by the property above: a text row whose ``images`` column is typed (a timestamp, all null) keeps
    ``images`` in its metadata as the images' content hashes, never encoded with the source column's type."""
    table = pa.table({"text": pa.array(["0"]), "images": pa.array([None], pa.timestamp("us", tz="UTC"))})

    def write(folder: Path) -> Path:
        path = folder / "src.parquet"
        pq.write_table(table, path)
        return path

    _check_ingest(write)


# ---- CSV: arbitrary text cells ---------------------------------------------------------------------

CELL = (st.text(max_size=8) | st.integers().map(str) | st.floats().map(str) | st.dates().map(str)
        | st.just("") | st.just('{"role": "user"}') | st.just('[{"role": "user", "content": "w1"}]'))


@PROPERTY
@given(st.lists(st.sampled_from(["prompt", "response", "messages", "text", "images", "x", ""]), min_size=1,
                max_size=4),
       st.lists(st.lists(CELL, min_size=4, max_size=4), max_size=5))
def test_arbitrary_csv_cells_never_crash_ingest(header, rows):
    def write(folder: Path) -> Path:
        path = folder / "src.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(r[: len(header)] for r in rows)
        return path

    _check_ingest(write)


# ---- what the properties found ---------------------------------------------------------------------


def test_a_lone_surrogate_escape_is_quarantined_not_a_crash(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "\\ud800 ", "response": "w1"}\n{"prompt": "w2 ", "response": "w3", "tag": "\\udc00"}\n'
                    '{"prompt": "w2 ", "response": "w3"}\n')
    ws = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(ws)
    rep = ingest_file(ws, "d", path, 2_000)
    assert (rep.rows, rep.kept, rep.quarantined) == (3, 1, 2)
    reasons = {q["row"]: q["reason"] for q in sstore.read_quarantine(ws, "d").to_pylist()}
    assert reasons == {0: "line 1: invalid Unicode (a lone surrogate escape)",
                       1: "line 2: invalid Unicode (a lone surrogate escape)"}


def test_a_file_of_empty_objects_is_quarantined_with_a_reason(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{}\nnot json\n{}\n')
    ws = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(ws)
    rep = ingest_file(ws, "d", path, 2_000)
    assert (rep.rows, rep.kept, rep.quarantined) == (3, 0, 3)
    reasons = {q["row"]: q["reason"] for q in sstore.read_quarantine(ws, "d").to_pylist()}
    assert reasons[0] == reasons[2] == "no sample fields: an empty object"
    assert reasons[1].startswith("line 2: malformed JSON")
