"""A workspace written by the code before issue 15 keeps working (its ``scores`` table has no ``truncated``
column, its features are of feature format 2): the table gains the column on first use, its old rows read it
as null ("not recorded"), new runs record it; old-format features are extracted again, and that is said."""

from __future__ import annotations

import datetime as dt
import json
import logging

import lancedb
import pyarrow as pa
import pytest
from tiny import random_rows, write_jsonl

from valuegate.engine.model import fingerprint_settings, load_tokenizer, model_fingerprint
from valuegate.settings import load_settings
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace
from valuegate.storage.samples import dataset_ids, ensure_sample_tables
from valuegate.storage.scores import read_score_run
from valuegate.tasks.extract import extract_dataset
from valuegate.tasks.ingest import ingest_file
from valuegate.tasks.score import score_dataset
from valuegate.tasks.validation_set import register_valset

TIMESTAMP = pa.timestamp("us", tz="UTC")
SIGNAL_COLUMNS = schemas.SIGNAL_COLUMNS  # unchanged since 94e3adf

# storage/schemas.py at 94e3adf (before issue 15): the scores table as old workspaces hold it
OLD_SCORES_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("value", pa.float64()),
    pa.field("aggregate", pa.string(), nullable=False),
    pa.field("normalize", pa.string(), nullable=False),
    pa.field("nearest_ids", pa.list_(pa.string())),
    pa.field("nearest_values", pa.list_(pa.float64())),
    pa.field("n_tokens", pa.int32()),
    pa.field("mean_loss", pa.float32()),
    pa.field("self_influence", pa.float64()),
    pa.field("suspect", pa.float64()),
    pa.field("suspect_reason", pa.string()),
    *[pa.field(name, pa.float64()) for name in SIGNAL_COLUMNS if name != "mean_loss"],
    pa.field("valset", pa.string(), nullable=False),
    pa.field("model_fp", pa.string(), nullable=False),
    pa.field("settings", pa.string(), nullable=False),
    pa.field("at", TIMESTAMP, nullable=False),
])
OLD_RUN = "20250101T000000Z-0ld0ld00"


@pytest.fixture
def old_ws(tmp_path):
    """A workspace with a dataset ``d``, a validation set ``val`` and a scores table of the old schema holding
    one run (``OLD_RUN``) of two rows, written with LanceDB directly."""
    ws = Workspace(str(tmp_path / "ws"))
    ensure_sample_tables(ws)
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(6, seed=41)), 10_000)
    register_valset(ws, "val", write_jsonl(tmp_path / "v.jsonl", random_rows(4, seed=42)), 10_000)
    ids = sorted(dataset_ids(ws, "d"))[:2]
    row = {name: None for name in OLD_SCORES_SCHEMA.names}
    row.update(run_id=OLD_RUN, dataset="d", aggregate="mean", normalize="none", valset="val@v1", model_fp="f" * 64,
               settings="{}", at=dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc), n_tokens=5)
    old = pa.Table.from_pylist([{**row, "id": ids[0], "value": 0.25}, {**row, "id": ids[1], "value": -1.5}],
                               schema=OLD_SCORES_SCHEMA)
    lancedb.connect(ws.uri).create_table(schemas.SCORES, data=old)
    return ws, ids


def _settings(model_dir, uri: str):
    return load_settings(overrides={"model": {"name": str(model_dir), "device": "cpu"}, "workspace": uri,
                                    "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8}})


def test_old_scores_table_gains_the_column_and_keeps_its_rows(old_ws, tiny_model_dir, caplog):
    ws, old_ids = old_ws
    settings = _settings(tiny_model_dir(), ws.uri)

    # reading an old run works before anything was written with the new code: the flag reads null
    with caplog.at_level(logging.INFO, logger="valuegate"):
        old = read_score_run(ws, OLD_RUN, "d")
    assert sorted(old["id"].to_list()) == old_ids and old["truncated"].to_list() == [None, None]
    added = [r.getMessage() for r in caplog.records if "added column" in r.getMessage()]
    assert len(added) == 1 and "'truncated'" in added[0] and "2 existing rows" in added[0], added

    rep = score_dataset(ws, "d", "val", settings, progress=False)  # before: incompatible schema
    assert rep.n_train == 6
    new = read_score_run(ws, rep.run_id, "d")
    assert new.height == 6 and new["truncated"].to_list() == [False] * 6
    assert ws.schema(schemas.SCORES).field("truncated").type == pa.bool_()
    again = read_score_run(ws, OLD_RUN, "d")  # the old rows as they were, the flag not recorded
    assert dict(zip(again["id"], again["value"], strict=True)) == {old_ids[0]: 0.25, old_ids[1]: -1.5}
    assert again["truncated"].null_count() == 2
    assert ws.count(schemas.SCORES) == 8


def test_a_table_that_differs_otherwise_is_still_refused(tmp_path):
    from valuegate.errors import ValuegateError

    ws = Workspace(str(tmp_path / "ws"))
    odd = pa.schema([f if f.name != "value" else pa.field("value", pa.string()) for f in OLD_SCORES_SCHEMA])
    lancedb.connect(ws.uri).create_table(schemas.SCORES, schema=odd)
    with pytest.raises(ValuegateError, match=r"incompatible schema: .*column 'value' is string, expected double"):
        ws.ensure(schemas.SCORES, schemas.scores_schema)
    assert "truncated" not in ws.schema(schemas.SCORES).names  # nothing half-migrated


@pytest.mark.parametrize("old", [
    {"format": 4, "sketch_dim": None},  # format 4 had no sketch_dim: a setting format 5 added
    {"format": 5, "sketch_dim": 256, "error_dim": 128},  # format 5's defaults of the side columns' widths
    {"format": 6},  # float32 pooled_hidden (Σ_t h_t) where format 7 stores the float16 mean_hidden
    {"format": 7},  # no max_loss / end_loss / prompt_overlap (format 8: the fault detectors' statistics)
])
def test_features_of_an_older_format_are_extracted_again_and_it_is_said(tmp_path, tiny_model_dir, caplog, old):
    ws = Workspace(str(tmp_path / "ws"))
    ensure_sample_tables(ws)
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(4, seed=43)), 10_000)
    settings = _settings(tiny_model_dir(), ws.uri)
    ex = settings.extract
    fps = fingerprint_settings(settings.model, ex, load_tokenizer(settings.model), ex.lowest_likelihood_ratio)
    # the same settings, stored by the older code
    old_fps = {k: v for k, v in {**fps, **old}.items() if not (k in old and v is None)}
    ws.append(schemas.FEATURE_SETS, pa.Table.from_pylist([{
        "model_fp": model_fingerprint(old_fps), "table": schemas.features_table(model_fingerprint(old_fps)),
        "settings": json.dumps(old_fps, sort_keys=True), "hidden_size": 32, "vocab_size": 200,
        "row_width": 32, "error_dim": 8, "created": dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)}],
        schema=schemas.feature_sets_schema), schemas.feature_sets_schema)

    with caplog.at_level(logging.INFO, logger="valuegate"):
        rep = extract_dataset(ws, "d", settings, progress=False)
    fmt = old["format"]
    assert rep.extracted == 4 and rep.older_format == fmt
    said = [r.getMessage() for r in caplog.records if "older" in r.getMessage()]
    assert len(said) == 1, said
    assert (f"feature format {fmt}" in said[0]
            and f"current format is {schemas.FEATURE_FORMAT}" in said[0] and "extracting 4" in said[0]), said
    # what `extract` prints
    assert rep.line().endswith(f"; re-extracted: the stored format {fmt} is older than {schemas.FEATURE_FORMAT}")

    caplog.clear()  # the next run finds its features: nothing to say
    with caplog.at_level(logging.INFO, logger="valuegate"):
        rep = extract_dataset(ws, "d", settings, progress=False)
    assert rep.extracted == 0 and rep.older_format is None
    assert not [r for r in caplog.records if "older" in r.getMessage()]
