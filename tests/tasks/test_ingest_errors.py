"""Ingestion's user errors and edge cases (issue 15): a missing source is one line (``ingest`` and ``run``,
never retried), a UTF-8 BOM is accepted, typed extra columns keep their Arrow types into a release, and
a chat row without an assistant turn is quarantined with its reason."""

from __future__ import annotations

import datetime as dt
import decimal
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_flow import _config
from tiny import random_rows, write_jsonl

from valuegate.cli import EXIT_USER_ERROR, main
from valuegate.errors import ValuegateError
from valuegate.inputs.identity import sample_id, sample_record
from valuegate.inputs.rows import read_samples
from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace
from valuegate.tasks.ingest import ingest_file


@pytest.fixture
def ws(tmp_path):
    w = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(w)
    return w


def _one_error_line(err: str, expected: str) -> None:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("valuegate: error:")]
    assert lines == [expected], err


# ---- a missing source file -------------------------------------------------------------------------


def test_ingest_of_a_missing_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    rc = main(["ingest", "d", str(missing), "--workspace", str(tmp_path / "ws"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR
    _one_error_line(err, f"valuegate: error: {missing}: no such file")
    assert err.strip().splitlines() == [f"valuegate: error: {missing}: no such file"]


def test_ingest_file_of_a_missing_file_raises_a_user_error(ws, tmp_path):
    with pytest.raises(ValuegateError, match=r"missing\.jsonl: no such file$"):
        ingest_file(ws, "d", tmp_path / "missing.jsonl", 10_000)


def test_run_with_a_missing_source_is_refused_before_anything_runs(prefect_harness, tiny_model_dir, tmp_path,
                                                                   capsys, monkeypatch):
    """Issue 26: a missing source was refused only after the server started and the flow created the
    workspace's tables; now before any step runs (no ingest attempt, no table)."""
    from valuegate.flows.refresh import refresh

    missing = tmp_path / "missing.jsonl"
    cfg = _config(tmp_path, tiny_model_dir(), data={"sources": [str(missing)]})
    import valuegate.tasks.ingest as ingest_mod

    attempts: list[str] = []
    real_source_files = ingest_mod.source_files  # the body's first read of a source (folders and globs expanded)

    def counted(spec):
        attempts.append(str(spec))
        return real_source_files(spec)

    monkeypatch.setattr(ingest_mod, "source_files", counted)
    state = refresh(config=cfg, return_state=True)
    assert state.is_failed()
    assert attempts == []  # refused before the ingest step
    monkeypatch.setattr(ingest_mod, "source_files", real_source_files)
    with pytest.raises(ValuegateError, match="no such file"):  # the flow's own error, not a wrapper
        state.result()
    assert not list((tmp_path / "ws").glob("*.lance"))

    capsys.readouterr()
    rc = main(["run", "--config", cfg])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR
    _one_error_line(err, f"valuegate: error: data.sources: {missing}: no such file or folder")


def test_valuegate_run_refuses_a_missing_source_before_its_server_starts(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    missing = tmp_path / "missing.jsonl"
    cfg = _config(tmp_path, tiny_model_dir(), data={"sources": [str(missing)]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    p = subprocess.run([sys.executable, "-m", "valuegate.cli", "run", "--config", cfg], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == EXIT_USER_ERROR
    # one line: no "Starting temporary server" before it, and no workspace made
    assert p.stderr.strip() == f"valuegate: error: data.sources: {missing}: no such file or folder"
    assert not (tmp_path / "ws").exists()


# ---- a UTF-8 BOM -----------------------------------------------------------------------------------


def test_a_utf8_bom_at_the_start_of_a_jsonl_file_is_accepted(ws, tmp_path):
    rows = random_rows(3, seed=3)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    rep = ingest_file(ws, "d", bom, 10_000)
    assert (rep.rows, rep.kept, rep.quarantined) == (3, 3, 0)
    members = sorted(sstore.read_members(ws, "d").to_pylist(), key=lambda m: m["row"])
    assert [json.loads(m["metadata"])["tag"] for m in members] == ["r0", "r1", "r2"]
    # the same ids as without the BOM, and the score path's reader agrees
    _, samples = read_samples(bom)
    assert [s.prompt for s in samples] == [r["prompt"] for r in rows]
    assert rep.duplicates == 0 and ingest_file(ws, "d", plain, 10_000).duplicates == 3
    # a BOM on a line of its own is an empty line
    bom.write_bytes(b"\xef\xbb\xbf\n" + plain.read_bytes())
    assert ingest_file(ws, "e", bom, 10_000).kept == 3


# ---- typed extra columns ---------------------------------------------------------------------------

TYPED = {
    "blob": (pa.binary(), [b"\x00\x01", b"\xff", None]),
    "seen_at": (pa.timestamp("us", tz="UTC"),
           [dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.timezone.utc), None,
            dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)]),
    "at_ns": (pa.timestamp("ns", tz="Europe/Paris"), [1_700_000_000_123_456_789, 5, None]),
    "day": (pa.date32(), [dt.date(2024, 2, 29), dt.date(1970, 1, 1), None]),
    "price": (pa.decimal128(10, 2), [decimal.Decimal("12345678.90"), None, decimal.Decimal("-0.05")]),
    "tag": (pa.string(), ["a", "b", "c"]),
}


def _typed_parquet(path, prompts=("w1 ", "w2 ", "w3 ")):
    cols = {"prompt": pa.array(list(prompts)), "response": pa.array(["w4", "w5", "w6"])}
    cols.update({k: pa.array(v, type=t) for k, (t, v) in TYPED.items()})
    table = pa.table(cols)
    pq.write_table(table, path)
    return table


def _score_rows(ws, dataset: str, run_id: str) -> None:
    """A scoring run of every member (scores written as scoring would; only the release frame is tested)."""
    ids = sstore.dataset_ids(ws, dataset)
    now = dt.datetime.now(dt.timezone.utc)
    ws.ensure(schemas.SCORES, schemas.scores_schema)
    ws.append(schemas.SCORES, pa.Table.from_pylist(
        [{"run_id": run_id, "dataset": dataset, "id": sid, "value": float(i), "aggregate": "mean",
          "normalize": "none", "valset": "v@v1", "model_fp": "fp", "settings": "{}", "at": now}
         for i, sid in enumerate(ids)], schema=schemas.scores_schema), schemas.scores_schema)


def test_typed_extra_columns_keep_their_arrow_types_into_the_release(ws, tmp_path):
    from valuegate.settings import SelectSettings
    from valuegate.storage import releases as rstore
    from valuegate.storage.scores import read_score_run
    from valuegate.tasks.select import select_samples

    source = _typed_parquet(tmp_path / "typed.parquet")
    rep = ingest_file(ws, "d", tmp_path / "typed.parquet", 10_000)
    assert (rep.kept, rep.quarantined) == (3, 0)
    _score_rows(ws, "d", "run1")
    selected = select_samples(read_score_run(ws, "run1", "d"), SelectSettings(policy="keep_all"))
    data = selected.filter(selected["keep"]).drop("keep", "reason")
    version = rstore.allocate_version(ws, "r")
    rstore.write_release(ws, "r", version, data, {})
    released = pq.read_table(rstore.release_dir(ws, "r", version) / rstore.DATA_FILE)
    by_prompt = {r["prompt"]: r for r in released.to_pylist()}
    for name, (typ, _) in TYPED.items():
        assert released.schema.field(name).type == typ, (name, released.schema.field(name).type)
        want = source.column(name).to_pylist()
        assert [by_prompt[p][name] for p in source.column("prompt").to_pylist()] == want, name


def test_typed_metadata_leaves_sample_ids_and_plain_metadata_as_before(ws, tmp_path):
    from valuegate.storage.metadata import metadata_frame

    _typed_parquet(tmp_path / "typed.parquet")
    ingest_file(ws, "d", tmp_path / "typed.parquet", 10_000)
    members = sorted(sstore.read_members(ws, "d").to_pylist(), key=lambda m: m["row"])
    # ids hash the sample's content only: the extra columns never move them
    assert members[0]["id"] == sample_id(sample_record(read_samples(_plain_pair(tmp_path))[1][0]))
    assert json.loads(members[0]["metadata"])["tag"] == "a"  # plain JSON values are stored as before
    # an old workspace's plain JSON metadata (and a user's dict that looks like a tag) read as they are
    old = [json.dumps({"tag": "x", "n": 1, "nested": {"type": "binary", "k": [1, 2]}}), None,
           json.dumps({"tag": "y", "n": 2})]
    frame = metadata_frame(old)
    assert frame.columns == ["tag", "n", "nested"]
    assert frame["tag"].to_list() == ["x", None, "y"]
    assert frame["nested"].to_list()[0] == {"type": "binary", "k": [1, 2]}
    assert metadata_frame([None, "{}"]) is None


def _plain_pair(tmp_path):
    return write_jsonl(tmp_path / "pair.jsonl", [{"prompt": "w1 ", "response": "w4"}])


def test_a_dict_column_shaped_like_the_type_tag_round_trips(ws, tmp_path):
    from valuegate.storage.metadata import metadata_frame

    weird = {"__valuegate__": "binary", "base64": "AAE="}
    write_jsonl(tmp_path / "w.jsonl", [{"prompt": "w1 ", "response": "w2", "extra": weird}])
    ingest_file(ws, "d", tmp_path / "w.jsonl", 10_000)
    frame = metadata_frame(sstore.read_members(ws, "d")["metadata"].to_pylist())
    assert frame["extra"].to_list() == [weird]


# ---- rows that can never be valued -----------------------------------------------------------------


def test_a_chat_without_an_assistant_turn_is_quarantined_with_its_reason(ws, tmp_path):
    rows = random_rows(3, seed=6, kind="messages")
    rows.append({"messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}],
                 "tag": "no-answer"})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    rep = ingest_file(ws, "d", path, 10_000)
    assert (rep.rows, rep.kept, rep.quarantined) == (4, 3, 1)
    assert rep.reasons == {"messages: no assistant turn": 1}
    q = sstore.read_quarantine(ws, "d").to_pylist()
    assert [(r["row"], r["reason"], r["source"]) for r in q] == [(3, "messages: no assistant turn",
                                                                 str(path.resolve()))]
    assert "no-answer" in q[0]["raw"]


def test_a_prompt_response_row_with_an_empty_response_is_quarantined(ws, tmp_path):
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "w1 ", "response": "w2"},
                                                {"prompt": "w1 ", "response": ""},
                                                {"prompt": "w1 ", "response": " \n "}])
    rep = ingest_file(ws, "d", path, 10_000)
    assert (rep.kept, rep.quarantined, rep.reasons) == (1, 2, {"response: empty": 2})


# ---- an oversized row names its long field (issue 26) ----------------------------------------------------


def test_an_oversized_row_names_the_field_that_is_long(ws, tmp_path):
    from valuegate.tasks.ingest import ingest_file

    big = "w" * (21 * 1024 * 1024)  # a 21 MB prompt, as a clumsy export makes
    rows = [{"prompt": big, "response": "ok"}, {"prompt": "ok", "response": big[:300_000]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": big[:300_000]}]}]
    reasons = []
    for n, row in enumerate(rows):
        path = tmp_path / f"row{n}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        rep = ingest_file(ws, f"d{n}", path, 200_000)
        assert rep.quarantined == 1
        (q,) = sstore.read_quarantine(ws, f"d{n}").to_pylist()
        reasons.append(q["reason"].split(":")[0])
    assert reasons == ["prompt", "response", "messages[1]"]


def test_one_sample_in_two_sources_keeps_the_typed_columns_of_both(ws, tmp_path):
    """Issue 26: the same samples in a JSONL (first by name, an extra ``note``) and a Parquet with binary,
    timestamp and decimal columns: the typed columns silently vanished from the release frame (only the
    first source row's metadata was read). Now the union: every column, nulls where no row has a value."""
    from valuegate.settings import SelectSettings
    from valuegate.storage.scores import read_score_run
    from valuegate.tasks.select import select_samples

    source = _typed_parquet(tmp_path / "b-typed.parquet")
    rows = [{"prompt": p, "response": r, "note": f"n{i}"} for i, (p, r) in
            enumerate(zip(source.column("prompt").to_pylist(), source.column("response").to_pylist(), strict=True))]
    write_jsonl(tmp_path / "a-plain.jsonl", rows)
    assert ingest_file(ws, "d", tmp_path / "a-plain.jsonl", 10_000).new_samples == 3
    assert ingest_file(ws, "d", tmp_path / "b-typed.parquet", 10_000).new_samples == 0  # the same samples
    _score_rows(ws, "d", "run1")
    frame = read_score_run(ws, "run1", "d")
    assert frame.height == 3 and frame["source"].to_list() == [str(tmp_path / "a-plain.jsonl")] * 3
    out = select_samples(frame, SelectSettings(policy="keep_all")).sort("prompt")
    assert out["note"].to_list() == ["n0", "n1", "n2"]
    for name, (_, values) in TYPED.items():
        assert name in out.columns, f"column {name} of the Parquet source vanished"
        assert out[name].null_count() == sum(v is None for v in values), name
    for name in ("blob", "seen_at", "day", "price", "tag"):
        assert out[name].to_list() == TYPED[name][1], name
