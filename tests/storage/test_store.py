"""Ingestion, the feature store, versioned validation sets and score-set, on a real LanceDB workspace
(local disk, and the S3-compatible server started by the `s3_server` fixture)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from tiny import assert_close_at_stored_precision, random_rows, write_jsonl

from valuegate.cli import EXIT_USER_ERROR, main
from valuegate.errors import ValuegateError
from valuegate.settings import load_settings
from valuegate.storage import features as fstore
from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace
from valuegate.storage.valsets import read_valset, read_valset_versions
from valuegate.tasks.ingest import ingest_file
from valuegate.tasks.score import score_dataset
from valuegate.tasks.validation_set import register_valset


@pytest.fixture
def ws(tmp_path):
    w = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(w)
    return w


def _settings(model_dir, ws, **extract):
    s = load_settings(overrides={"model": {"name": str(model_dir), "device": "cpu"},
                                 "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8, **extract},
                                 "workspace": ws.uri})
    return s


def _hf_save_to_disk(path, rows):
    """The layout `datasets.Dataset.save_to_disk` writes: an Arrow IPC stream + state.json."""
    path.mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (path / "dataset_info.json").write_text("{}")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "hf"])
def test_every_format_ingests_the_same_samples(ws, tmp_path, fmt):
    rows = random_rows(6, seed=4)
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "parquet":
        pl.DataFrame(rows).write_parquet(path)
    elif fmt == "csv":
        pl.DataFrame(rows).write_csv(path)
    else:
        path = _hf_save_to_disk(tmp_path / "hf", rows)
    rep = ingest_file(ws, "d", path, 10_000)
    assert (rep.rows, rep.kept, rep.new_samples, rep.quarantined) == (6, 6, 6, 0)
    members = sstore.read_members(ws, "d").to_pylist()
    assert sorted(m["row"] for m in members) == list(range(6))
    assert {json.loads(m["metadata"])["tag"] for m in members} == {f"r{i}" for i in range(6)}


def test_same_content_from_any_format_has_the_same_id(ws, tmp_path):
    rows = random_rows(4, seed=5)
    write_jsonl(tmp_path / "a.jsonl", rows)
    pl.DataFrame(rows).write_parquet(tmp_path / "b.parquet")
    ingest_file(ws, "d", tmp_path / "a.jsonl", 10_000)
    rep = ingest_file(ws, "d", tmp_path / "b.parquet", 10_000)
    assert (rep.new_samples, rep.duplicates) == (0, 4)
    assert len(sstore.dataset_ids(ws, "d")) == 4
    assert ws.count(schemas.SAMPLES) == 4


@pytest.mark.parametrize("chunk_rows", [3, 50_000])
def test_each_quarantine_reason_and_nothing_lost(ws, tmp_path, chunk_rows):
    good = random_rows(3, seed=6)
    lines = [json.dumps(good[0]), '{"prompt": "w1 ", "response": ', json.dumps({"prompt": "w1 ", "response": 7}),
             json.dumps({"prompt": "w1 ", "response": "   "}), json.dumps({"prompt": None, "response": "w2"}),
             json.dumps({"prompt": "w1 ", "response": "w2 " * 50}), json.dumps(good[1]), "[1, 2]"]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff", "response": "w1"}\n'
                     + (json.dumps(good[2]) + "\n").encode())
    rep = ingest_file(ws, "d", path, max_chars=60, chunk_rows=chunk_rows)
    assert rep.rows == 10 and rep.kept == 3 and rep.quarantined == 7
    assert sorted(m["row"] for m in sstore.read_members(ws, "d").to_pylist()) == [0, 6, 9]
    q = {r["row"]: r for r in sstore.read_quarantine(ws, "d").to_pylist()}
    assert "malformed JSON" in q[1]["reason"]
    assert q[2]["reason"].startswith("response: expected a string (got int)")
    assert q[3]["reason"] == "response: empty"
    assert q[4]["reason"].startswith("prompt: expected a string (got null)")
    assert "oversized" in q[5]["reason"]
    assert "expected a JSON object" in q[7]["reason"]
    assert "invalid UTF-8" in q[8]["reason"]
    assert all(q[r]["raw"] for r in q) and q[5]["raw"].startswith('{"prompt"')
    # counted by the problem's field and what is wrong (data), never by the row's line, value or size
    assert rep.reasons == {"line: malformed JSON": 1, "response: expected a string": 1, "response: empty": 1,
                           "prompt: expected a string": 1, "response: oversized": 1,
                           "line: expected a JSON object": 1, "line: invalid UTF-8": 1}, rep.reasons


def test_reingest_is_a_noop_and_a_changed_file_adds_only_new_rows(ws, tmp_path):
    rows = random_rows(5, seed=7)
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ingest_file(ws, "d", path, 10_000)
    versions = {t: ws.version(t) for t in (schemas.SAMPLES, schemas.MEMBERS, schemas.INGESTS)}
    assert ingest_file(ws, "d", path, 10_000).unchanged
    assert {t: ws.version(t) for t in versions} == versions
    extra = random_rows(2, seed=8)
    write_jsonl(path, rows[1:] + extra)  # row 0 leaves, two rows arrive
    rep = ingest_file(ws, "d", path, 10_000)
    assert (rep.new_samples, rep.left) == (2, 1)
    assert len(sstore.dataset_ids(ws, "d")) == 6
    last = sstore.read_last_ingest(ws, "d", str(path.resolve()))
    assert len(last["left_ids"]) == 1 and last["left_ids"][0] not in sstore.dataset_ids(ws, "d")


def _ingest_in_process(uri: str, path: str) -> int:
    w = Workspace(uri)
    sstore.ensure_sample_tables(w)
    return ingest_file(w, "d", path, 10_000, chunk_rows=7).kept


def test_concurrent_ingests_of_one_source_leave_each_row_once(ws, tmp_path):
    """Two refresh runs at once ingest the same files: every row (member or quarantined) stays once."""
    import multiprocessing as mp

    rows = random_rows(40, seed=31) + [{"prompt": "p", "response": "   "}] * 3  # 3 rows go to quarantine
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with mp.get_context("spawn").Pool(3) as pool:  # LanceDB is not fork-safe
        kept = pool.starmap(_ingest_in_process, [(ws.uri, str(path))] * 3)
    assert max(kept) == 40  # a process that found the completed ingest of another reports 0
    members = sstore.read_members(ws, "d", columns=["source", "row"]).to_pylist()
    assert len(members) == 40 and len({(m["source"], m["row"]) for m in members}) == 40
    quarantined = sstore.read_quarantine(ws, "d").to_pylist()
    assert sorted(q["row"] for q in quarantined) == [40, 41, 42]


def test_extract_resumes_after_a_crash_between_batches(ws, tmp_path, tiny_model_dir, monkeypatch):
    from valuegate.cli import main as cli

    path = write_jsonl(tmp_path / "t.jsonl", random_rows(20, seed=9))
    ingest_file(ws, "d", path, 10_000)
    args = ["extract", "d", "--workspace", ws.uri, "--model", str(tiny_model_dir()), "--quiet",
            "--batch-size", "4", "--support-k", "8"]
    calls = {"n": 0}
    real = fstore.write_features

    def crash_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt  # as a Ctrl-C between batches
        return real(*a, **k)

    monkeypatch.setattr(fstore, "write_features", crash_after_two)
    from valuegate.tasks import extract as extract_mod

    real_extract = extract_mod.extract_to_store
    monkeypatch.setattr(extract_mod, "extract_to_store",
                        lambda *a, **k: real_extract(*a, **{**k, "write_every": 4}))
    assert cli(args) == 130
    sets = ws.read(schemas.FEATURE_SETS).to_pylist()
    fp = sets[0]["model_fp"]
    assert ws.count(schemas.features_table(fp)) == 8
    monkeypatch.setattr(fstore, "write_features", real)
    assert cli(args) == 0
    ids = ws.read(schemas.features_table(fp), columns=["id"])["id"].to_pylist()
    assert len(ids) == 20 and len(set(ids)) == 20
    assert set(ids) == set(sstore.dataset_ids(ws, "d"))
    before = ws.version(schemas.features_table(fp))
    assert cli(args) == 0
    assert ws.version(schemas.features_table(fp)) == before  # nothing left to do: no commit


def test_validation_versions_are_immutable_and_addressable(ws, tmp_path):
    a = write_jsonl(tmp_path / "v1.jsonl", random_rows(3, seed=10))
    b = write_jsonl(tmp_path / "v2.jsonl", random_rows(4, seed=11))
    r1, new1 = register_valset(ws, "val", a, 10_000)
    r2, new2 = register_valset(ws, "val", b, 10_000)
    r3, new3 = register_valset(ws, "val", a, 10_000)
    assert (r1["version"], r2["version"], new1, new2) == (1, 2, True, True)
    assert (r3["version"], new3) == (1, False)  # identical content: the existing version
    assert read_valset(ws, "val@v1")[1].num_rows == 3
    assert read_valset(ws, "val")[1].num_rows == 4
    assert read_valset(ws, "val@2")[0]["version"] == 2
    assert [r["version"] for r in read_valset_versions(ws, "val")] == [1, 2]
    with pytest.raises(ValuegateError, match=r"val@v9 does not exist \(versions: v1, v2\)"):
        read_valset(ws, "val@v9")
    with pytest.raises(ValuegateError, match="no validation set named 'nope'"):
        read_valset(ws, "nope")
    from valuegate.storage.valsets import prune_valset_version

    prune_valset_version(ws, "val", 1)
    with pytest.raises(ValuegateError, match="val@v1 was pruned"):
        read_valset(ws, "val@v1")
    assert read_valset(ws, "val@v2")[1].num_rows == 4
    assert [r["pruned"] for r in read_valset_versions(ws, "val")] == [True, False]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1 ", "response": ""}\n')
    with pytest.raises(ValuegateError, match=r"bad.jsonl: row 0: response: empty"):
        register_valset(ws, "val", bad, 10_000)


def test_score_set_equals_file_scoring_and_is_pinned(ws, tmp_path, tiny_model_dir, monkeypatch):
    """Scores from the store equal `valuegate score` on the same files (same settings), whatever the
    scoring chunk, up to the int8 rounding of the stored rows."""
    from valuegate.file_scoring import score_files
    from valuegate.tasks import score as score_mod

    monkeypatch.setattr(score_mod, "SCORE_CHUNK", 5)  # 12 samples: three chunks

    model = tiny_model_dir()
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(12, seed=12))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(4, seed=13))
    ingest_file(ws, "d", train, 10_000)
    register_valset(ws, "val", valid, 10_000)
    settings = _settings(model, ws)
    settings.score.aggregate = "nearest"
    settings.score.nearest_k = 2
    rep = score_dataset(ws, "d", "val", settings, progress=False)
    assert rep.extract_train.extracted == 12 and rep.extract_valid.extracted == 4
    df, _ = score_files(str(train), str(valid), settings, progress=False)
    stored = {r["id"]: r for r in ws.read(schemas.SCORES).to_pylist()}
    from valuegate.inputs.identity import sample_id, sample_record
    from valuegate.inputs.verdicts import read_source_rows

    ids = [sample_id(sample_record(v.sample)) for v in read_source_rows(train, 10_000)]
    assert_close_at_stored_precision([stored[i]["value"] for i in ids], df["value"].to_numpy())
    row = stored[ids[0]]
    assert row["valset"] == "val@v1" and row["model_fp"] == rep.model_fp and len(row["nearest_ids"]) == 2
    assert row["nearest_values"][0] >= row["nearest_values"][1]
    np.testing.assert_allclose(np.mean(row["nearest_values"]), row["value"], rtol=1e-12)
    settings.score.aggregate = "mean"
    mean_rep = score_dataset(ws, "d", "val", settings, progress=False)
    mean_df, _ = score_files(str(train), str(valid), settings, progress=False)
    got = dict(zip(mean_rep.table["id"].to_pylist(), mean_rep.table["value"].to_pylist(), strict=True))
    assert_close_at_stored_precision([got[i] for i in ids], mean_df["value"].to_numpy())
    # every signal and the suspect score too (the store path streams chunks; the file path does not)
    stored_t = mean_rep.table.to_pydict()
    pos = {i: n for n, i in enumerate(stored_t["id"])}
    for col in ("suspect", *schemas.FAULT_SCORE_COLUMNS, "centred_cosine_nearest", "hard_value_mean",
                "log_self_influence"):
        # (the fault detectors read the same per-row statistics on both paths, and the mean hidden states
        # the store keeps in float16: the neighbourhoods are the same, the spreads move by that rounding)
        got_col = np.array([stored_t[col][pos[i]] for i in ids], dtype=np.float64)
        assert_close_at_stored_precision(got_col, mean_df[col].cast(pl.Float64).to_numpy(), err_msg=col)
    assert [stored_t["fault"][pos[i]] for i in ids] == mean_df["fault"].to_list()
    np.testing.assert_allclose([stored_t["hard_mean_loss"][pos[i]] for i in ids], mean_df["hard_mean_loss"],
                               rtol=1e-6)  # not from the rows: as extracted
    # with the signals off the values come through the plain CSR path (one weighted vector for mean)
    settings.score.signals = False
    off = score_dataset(ws, "d", "val", settings, progress=False, write=False).table.to_pydict()
    np.testing.assert_allclose(off["value"], [got[i] for i in off["id"]], rtol=1e-6)
    assert off["suspect"] == [None] * 12
    settings.score.signals = True
    settings.score.aggregate = "nearest"
    assert json.loads(row["settings"])["settings"]["score"]["aggregate"] == "nearest"
    # a new validation version re-scores without running the model on training data
    register_valset(ws, "val", write_jsonl(tmp_path / "v2.jsonl", random_rows(5, seed=14)), 10_000)
    rep2 = score_dataset(ws, "d", "val@v2", settings, progress=False)
    assert rep2.extract_train.extracted == 0 and rep2.extract_train.already == 12
    assert rep2.extract_valid.extracted == 5
    runs = ws.read(schemas.SCORES, columns=["run_id", "valset"]).to_pylist()
    assert {(r["valset"]) for r in runs} == {"val@v1", "val@v2"} and len(runs) == 36


def test_store_cli_round_trip(tmp_path, tiny_model_dir, capsys):
    wsdir = str(tmp_path / "ws")
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(6, seed=15))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(3, seed=16))
    common = ["--workspace", wsdir, "--quiet"]
    assert main(["ingest", "d", str(train), *common]) == 0
    assert "6 rows, 6 kept" in capsys.readouterr().err
    assert main(["valset", "register", "val", str(valid), *common]) == 0
    assert "registered val@v1 (3 rows" in capsys.readouterr().out
    assert main(["valset", "list", *common]) == 0
    assert capsys.readouterr().out.startswith("val@v1  rows=3")
    assert main(["valset", "show", "val@v1", *common]) == 0
    assert "val@v1: 3 rows" in capsys.readouterr().out
    assert main(["score-set", "d", "--valset", "val@v1", "--model", str(tiny_model_dir()), *common]) == 0
    assert "against val@v1 (3)" in capsys.readouterr().err
    assert main(["score-set", "nope", "--valset", "val", "--model", str(tiny_model_dir()), *common]) == EXIT_USER_ERROR
    assert "dataset 'nope' has no samples" in capsys.readouterr().err


def test_s3_workspace_end_to_end(s3_server, tmp_path, tiny_model_dir):
    """ingest → extract → score-set with the workspace on a local S3-compatible server."""
    uri = s3_server.make_bucket("vg-e2e") + "/ws"
    ws = Workspace(uri, s3_server.storage_options)
    sstore.ensure_sample_tables(ws)
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(8, seed=17))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(3, seed=18))
    assert ingest_file(ws, "d", train, 10_000).kept == 8
    assert ingest_file(ws, "d", train, 10_000).unchanged
    register_valset(ws, "val", valid, 10_000)
    rep = score_dataset(ws, "d", "val@v1", _settings(tiny_model_dir(), ws), progress=False)
    assert rep.n_train == 8 and ws.count(schemas.SCORES) == 8
    assert np.isfinite(ws.read(schemas.SCORES)["value"].to_numpy()).all()


@pytest.mark.parametrize("how", ["none", "length", "cosine"])
def test_mean_through_one_vector_equals_mean_of_the_pairwise_matrix(how):
    import scipy.sparse as sp

    from valuegate.engine.aggregate import mean_aggregate
    from valuegate.engine.oracle import ValueMatrix, normalize

    rng = np.random.default_rng(0)
    tm = sp.random(30, 400, density=0.05, random_state=1, format="csr")
    vm = sp.random(7, 400, density=0.05, random_state=2, format="csr")
    tm.data = rng.normal(size=tm.data.size)
    vm.data = rng.normal(size=vm.data.size)
    t_self = np.asarray(tm.multiply(tm).sum(1)).ravel()
    v_self = np.asarray(vm.multiply(vm).sum(1)).ravel()
    t_tok, v_tok = rng.integers(1, 9, 30), rng.integers(1, 9, 7)
    full = ValueMatrix((tm @ vm.T).toarray(), t_self, v_self, t_tok, v_tok, np.zeros(30))
    np.testing.assert_allclose(mean_aggregate(tm, vm, t_self, v_self, t_tok, v_tok, how),
                               normalize(full, how).mean(1), rtol=1e-10, atol=1e-12)
