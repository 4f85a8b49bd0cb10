"""The Python API (``valuegate.score``, ``valuegate.Workspace``): every input kind gives the CLI's numbers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from tiny import random_rows, write_jsonl

import valuegate
from valuegate.cli import main
from valuegate.errors import ValuegateError

SCORE_COLUMNS = ["row", "value", "nearest_rows", "n_tokens", "truncated", "mean_loss", "self_influence",
                 "suspect", "suspect_reason"]


def _cli_scores(model, train, valid, out, *extra) -> pl.DataFrame:
    assert main(["score", str(train), str(valid), "--model", str(model), "--device", "cpu", "--out", str(out),
                 "--quiet", *extra]) == 0
    return pl.read_parquet(out)


def _same_numbers(api: pl.DataFrame, cli: pl.DataFrame) -> None:
    from valuegate.storage.schemas import SIGNAL_COLUMNS

    cols = SCORE_COLUMNS + [c for c in SIGNAL_COLUMNS if c != "mean_loss"]
    assert set(cols) <= set(api.columns)
    for c in cols:
        a, b = api[c].to_list(), cli[c].to_list()
        if api[c].dtype.is_float():
            np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=c)
        else:
            assert a == b, c
    # the input columns are carried through, before the score columns
    assert api.columns[:3] == ["prompt", "response", "tag"] and api["tag"].to_list() == cli["tag"].to_list()


def test_import_is_cheap_and_names_resolve_lazily():
    code = ("import sys, valuegate; heavy = [m for m in ('polars', 'torch', 'transformers', 'lancedb', "
            "'pydantic') if m in sys.modules]; assert not heavy, heavy; "
            "assert callable(valuegate.score) and valuegate.Workspace.__name__ == 'Workspace'; "
            "assert {'score', 'Workspace', 'Settings'} <= set(dir(valuegate))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with pytest.raises(AttributeError, match="no_such_name"):
        valuegate.no_such_name  # noqa: B018


def test_every_input_kind_gives_the_cli_numbers(tiny_model_dir, data_files, tmp_path):
    import datasets
    import pandas as pd

    model = tiny_model_dir()
    train, valid = data_files
    cli = _cli_scores(model, train, valid, tmp_path / "cli.parquet", "--aggregate", "nearest", "--nearest-k", "2")
    settings = {"model": {"name": str(model), "device": "cpu"}, "score": {"aggregate": "nearest", "nearest_k": 2}}
    train_pl, valid_pl = pl.read_ndjson(train), pl.read_ndjson(valid)
    inputs = {
        "path": (str(train), valid),  # str and Path
        "polars": (train_pl, valid_pl),
        "pandas": (train_pl.to_pandas(), pd.read_json(valid, lines=True)),
        "datasets": (datasets.Dataset.from_polars(train_pl), datasets.Dataset.from_json(str(valid))),
    }
    for kind, (t, v) in inputs.items():
        out = valuegate.score(t, v, **settings)
        assert isinstance(out, pl.DataFrame), kind
        assert out.height == 9, kind
        _same_numbers(out, cli)


def test_chat_frames_and_a_settings_object(tiny_model_dir, tmp_path):
    from valuegate.settings import tiny_settings

    model = tiny_model_dir("qwen2")
    chat = write_jsonl(tmp_path / "chat.jsonl", random_rows(6, 8, "messages"))
    cli = _cli_scores(model, chat, chat, tmp_path / "c.parquet", "--method", "exact", "--batch-size", "4",
                      "--max-length", "64", "--support-k", "8", "--hidden-dim", "0")
    # a Settings object, with keyword sections on top of it
    base = tiny_settings(model)  # error_dim differs from the CLI's default: it never changes a value
    frame = pl.read_ndjson(chat)
    out = valuegate.score(frame.to_pandas(), frame, base, score={"method": "exact"})
    for c in ("value", "mean_loss", "self_influence", "suspect"):
        np.testing.assert_allclose(out[c].to_numpy(), cli[c].to_numpy(), rtol=1e-6, err_msg=c)
    assert base.score.method == "sparse"  # the object passed in is not changed


def test_bad_inputs_are_one_line_errors(tiny_model_dir, data_files):
    import pandas as pd

    train, valid = data_files
    model = {"name": str(tiny_model_dir()), "device": "cpu"}
    with pytest.raises(ValuegateError, match=r"train \(pandas.DataFrame\): no sample fields.*\['a', 'b'\]"):
        valuegate.score(pd.DataFrame({"a": [1], "b": ["x"]}), valid, model=model)
    bad = pl.DataFrame({"prompt": ["w1 w2", "w3"], "response": ["w4", None]})
    with pytest.raises(ValuegateError, match=r"valid \(polars.DataFrame\): row 1: response"):
        valuegate.score(train, bad, model=model)
    with pytest.raises(ValuegateError, match=r"unknown key score.aggregat \(did you mean score.aggregate\?\)"):
        valuegate.score(train, valid, model=model, score={"aggregat": "mean"})
    with pytest.raises(ValuegateError, match=r"unknown key modle \(did you mean model\?\)"):
        valuegate.score(train, valid, modle=model)
    with pytest.raises(TypeError, match=r"train: expected a path, a polars or pandas DataFrame or a datasets\.Dataset"):
        valuegate.score([{"prompt": "a", "response": "b"}], valid, model=model)


def test_workspace_ingest_valset_extract_score(tiny_model_dir, data_files, tmp_path, capsys):
    train, valid = data_files
    ws = valuegate.Workspace(tmp_path / "ws", model={"name": str(tiny_model_dir()), "device": "cpu"},
                             extract={"batch_size": 4})
    assert ws.uri == str(tmp_path / "ws") and "ws" in repr(ws)
    reports = ws.ingest("train", train)
    assert [(r.rows, r.kept, r.new_samples) for r in reports] == [(9, 9, 9)]
    assert ws.ingest("train", train)[0].unchanged  # re-ingest is a no-op
    rec = ws.register_valset("val", valid)
    assert (rec["name"], rec["version"], rec["rows"]) == ("val", 1, 4)
    ex = ws.extract("train")
    assert (ex.requested, ex.extracted) == (9, 9)
    run = ws.score("train", "val")
    assert (run.n_train, run.n_valid, run.valset) == (9, 4, "val@v1")
    assert run.extract_train.already == 9  # extracted above, read from the store
    scores = ws.scores("train", run.run_id)
    assert scores.height == 9 and scores["value"].is_finite().all()
    assert sorted(scores["prompt"].to_list()) == sorted(pl.read_ndjson(train)["prompt"].to_list())
    # settings per call: another aggregate is another scores run over the same features
    near = ws.score("train", "val@v1", score={"aggregate": "nearest"})
    assert near.run_id != run.run_id and near.extract_train.extracted == 0
    assert ws.releases("r") == []
    # the CLI's score-set on the same workspace and settings: a new run with the same numbers
    capsys.readouterr()
    assert main(["score-set", "train", "--valset", "val", "--workspace", ws.uri, "--model",
                 str(tiny_model_dir()), "--device", "cpu", "--batch-size", "4", "--quiet"]) == 0
    cli_run = capsys.readouterr().err.split("scores run ", 1)[1].split(":", 1)[0]
    assert cli_run not in (run.run_id, near.run_id)
    cli = ws.scores("train", cli_run).sort("id")
    for c in ("value", "mean_loss", "self_influence", "suspect"):
        np.testing.assert_array_equal(cli[c].to_numpy(), scores.sort("id")[c].to_numpy(), err_msg=c)

def test_readme_five_line_example(tiny_model_dir, data_files, tmp_path, monkeypatch):
    """The README's five lines ("From Python"), with the tiny model named where the README relies on the default one."""
    assert {p.name for p in data_files} == {"train.jsonl", "valid.jsonl"}
    monkeypatch.chdir(tmp_path)
    tiny = {"name": str(tiny_model_dir())}
    # --- the README's example (it has no model=...: the embedded default model) ---
    import valuegate
    scores = valuegate.score("train.jsonl", "valid.jsonl", model=tiny)   # polars.DataFrame, one row per sample
    print(scores.sort("suspect", descending=True).select("row", "value", "suspect").head(3))
    kept = scores.filter(scores["keep"])                      # what a run's policy (select.policy) keeps
    kept.write_parquet("kept.parquet")
    # ---
    kept = pl.read_parquet(tmp_path / "kept.parquet")
    threshold = valuegate.settings.SelectSettings().suspect_threshold
    assert scores.height == 9 and 0 < kept.height <= 9 and (kept["suspect"] <= threshold).all()
    assert kept.columns == scores.columns


def test_score_returns_the_run_policys_keep_and_reads_mapped_columns(tiny_model_dir, tmp_path):
    """Issue 28: `keep` and `reason` are the select step's own decision under the configured policy (not a
    re-implementation), and `fields=` / `--field` name the columns of any other shape."""
    from valuegate.inputs.identity import sample_id, sample_record
    from valuegate.inputs.rows import samples_from_frame
    from valuegate.settings import SelectSettings
    from valuegate.tasks.select import select_samples

    rows = random_rows(12, seed=5)
    qa = pl.DataFrame({"question": [r["prompt"] for r in rows], "answer": [r["response"] for r in rows]})
    train = tmp_path / "qa.csv"
    qa.write_csv(train)
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(5, seed=6))
    model = {"name": str(tiny_model_dir()), "device": "cpu"}
    policy = {"policy": "top_fraction", "fraction": 0.5}
    out = valuegate.score(train, valid, fields={"prompt": "question", "response": "answer"}, model=model,
                          select=policy)
    assert out.columns[:2] == ["question", "answer"] and out["keep"].sum() == 6
    ids = [sample_id(sample_record(s)) for s in samples_from_frame(qa, "qa", fields={"prompt": "question",
                                                                                   "response": "answer"})]
    want = select_samples(out.with_columns(pl.Series("id", ids)), SelectSettings(**policy))
    assert out["keep"].to_list() == want["keep"].to_list() and out["reason"].to_list() == want["reason"].to_list()
    cli = _cli_scores(model["name"], train, valid, tmp_path / "o.parquet", "--field", "prompt=question",
                      "--field", "response=answer", "--select.policy", "top_fraction", "--select.fraction", "0.5")
    assert cli["keep"].to_list() == out["keep"].to_list()
    with pytest.warns(UserWarning, match="no keep column: select.policy = suspect"):
        quiet = valuegate.score(train, valid, fields={"prompt": "question", "response": "answer"}, model=model,
                                score={"signals": False})
    assert "keep" not in quiet.columns


def test_one_named_detector_is_the_suspect_score(tiny_model_dir, tmp_path):
    """docs/faults.md: a user who knows the fault scores that detector alone (`score.suspect = ["mismatch"]`):
    `suspect` is then its calibrated score, `fault` names only it, and the other detectors' columns are null."""
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(16, seed=7))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(6, seed=8))
    model = {"name": str(tiny_model_dir()), "device": "cpu"}
    both = valuegate.score(train, valid, model=model)
    one = valuegate.score(train, valid, model=model, score={"suspect": ["mismatch"]})
    np.testing.assert_allclose(one["suspect"].to_numpy(), one["fault_mismatch"].fill_null(0.0).to_numpy())
    np.testing.assert_allclose(one["fault_mismatch"].to_numpy(), both["fault_mismatch"].to_numpy())
    assert set(one["fault"].drop_nulls().to_list()) <= {"mismatch"}
    assert all(one[c].null_count() == one.height for c in ("fault_echo", "fault_garbled", "fault_cut"))
    assert set(both["fault"].drop_nulls().to_list()) - {"mismatch"}, "the default names other detectors too"
