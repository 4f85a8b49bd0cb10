"""Samples longer than ``extract.max_length`` are never valued silently (issue 15, point 4), and every
sample that reaches extraction gets a score or a reason (point 5): a ``truncated`` column and count under
``truncation = "truncate"``, a refusal with its reason under ``"refuse"``, and the unscored counted by reason."""

from __future__ import annotations

import pytest
from tiny import WORDS, write_jsonl

from valuegate.errors import ValuegateError
from valuegate.file_scoring import score_files, summary_line
from valuegate.settings import load_settings
from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace, sql_str
from valuegate.storage.scores import read_score_run
from valuegate.tasks.ingest import ingest_file
from valuegate.tasks.score import score_dataset
from valuegate.tasks.validation_set import register_valset

MAX_LENGTH = 8  # tokens: each word of the tiny vocabulary is one token


def _words(i: int, n: int) -> str:
    return " ".join(WORDS[(i + j) % 40] for j in range(n))


def _rows() -> list[dict]:
    short = [{"prompt": _words(i, 2) + " ", "response": _words(i + 5, 3)} for i in range(6)]
    long = [{"prompt": _words(i, 2) + " ", "response": _words(i + 9, 12)} for i in range(3)]  # cut at 8
    beyond = [{"prompt": _words(30, 10) + " ", "response": _words(3, 2)}]  # response starts past token 8
    return short + long + beyond


def _valid() -> list[dict]:
    return [{"prompt": _words(i, 2) + " ", "response": _words(i + 3, 3)} for i in range(20, 24)]


def _settings(model_dir, truncation: str, uri: str | None = None):
    return load_settings(overrides={"model": {"name": str(model_dir), "device": "cpu"},
                                    # prompt + response as they are: the token counts below are the words
                                    "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8, "template": "none",
                                                "max_length": MAX_LENGTH, "truncation": truncation},
                                    **({"workspace": uri} if uri else {})})


def test_file_scoring_flags_and_counts_truncated_samples_or_refuses_them(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", _rows()[:9])
    valid = write_jsonl(tmp_path / "valid.jsonl", _valid())
    df, vm = score_files(str(train), str(valid), _settings(tiny_model_dir(), "truncate"), progress=False)
    assert df["truncated"].to_list() == [False] * 6 + [True] * 3
    assert "3 truncated at max_length=8" in summary_line(df, vm, _settings(tiny_model_dir(), "truncate"), "o")
    with pytest.raises(ValuegateError, match=r"train\.jsonl: row 6: response: \d+ tokens, longer than "
                                             r"max_length=8 \(extract\.truncation = refuse\)"):
        score_files(str(train), str(valid), _settings(tiny_model_dir(), "refuse"), progress=False)


def test_store_scoring_reports_truncated_and_unscored_samples(tmp_path, tiny_model_dir):
    ws = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(ws)
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", _rows()), 10_000)
    register_valset(ws, "v", str(write_jsonl(tmp_path / "v.jsonl", _valid())), 10_000)
    ids = sstore.dataset_ids(ws, "d")
    rows = {r["id"]: r for r in sstore.read_samples_by_id(ws, ids).to_pylist()}
    long_ids = {i for i, r in rows.items() if len(r["response"].split()) == 12}
    beyond_id = next(i for i, r in rows.items() if len(r["prompt"].split()) == 10)

    rep = score_dataset(ws, "d", "v", _settings(tiny_model_dir(), "truncate", ws.uri), progress=False)
    assert rep.n_train == 9 and rep.truncated == 3
    assert "3 truncated at max_length" in rep.extract_train.line() and "3 truncated" in rep.line()
    assert rep.unscored == {"every counted token lies beyond max_length": 1}
    assert [u.id for u in rep.unscored_ids] == [beyond_id] and "not scored: 1 every counted" in rep.line()
    scored = read_score_run(ws, rep.run_id, "d")
    assert {r["id"] for r in scored.filter(scored["truncated"]).to_dicts()} == long_ids
    assert scored.height == 9 and scored["truncated"].sum() == 3

    # the same features, now refused: nothing is extracted again, the cut samples get a reason instead
    rep = score_dataset(ws, "d", "v", _settings(tiny_model_dir(), "refuse", ws.uri), progress=False)
    assert rep.extract_train.extracted == 0 and rep.n_train == 6 and rep.truncated == 0
    assert rep.unscored == {"longer than max_length": 4}  # the one cut before its response too
    assert {u.id for u in rep.unscored_ids} == long_ids | {beyond_id}
    run = ws.read(schemas.SCORES, where=f"run_id = {sql_str(rep.run_id)}", columns=["id"])["id"].to_pylist()
    assert len(run) == 6 and not set(run) & (long_ids | {beyond_id})


def test_an_unscored_sample_names_its_file_and_row_and_is_counted_by_its_refusal(tmp_path, tiny_model_dir):
    """The reason a sample is left out is data its refusal carries (never matched in the message's text), and
    the message names the file and row the sample came from (it said ``store: row 0``, for every sample)."""
    root = tmp_path / "ws"
    ws = Workspace(str(root))
    sstore.ensure_sample_tables(ws)
    train = write_jsonl(tmp_path / "longer than max_length.jsonl", _rows())
    ingest_file(ws, "d", train, 10_000)
    register_valset(ws, "v", str(write_jsonl(tmp_path / "v.jsonl", _valid())), 10_000)
    rep = score_dataset(ws, "d", "v", _settings(tiny_model_dir(), "truncate", ws.uri), progress=False)
    (left,) = rep.unscored_ids
    assert left.message.startswith(f"{train}: row 9: response: every counted token lies beyond max_length"), left
    assert left.reason == "every counted token lies beyond max_length"
    assert rep.unscored == {"every counted token lies beyond max_length": 1}
