"""A release is a dataset: ``datasets.load_dataset(<release dir>)`` reads its kept rows through the card's
YAML header, and the card says where they come from (issue 16)."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from valuegate.dataset_card import CARD_FILE, card_features, release_frames, score_columns
from valuegate.storage import releases as store
from valuegate.tasks.release import diff_releases, publish_release

datasets = pytest.importorskip("datasets")

NAME = "demo"
SHA = "c0ffee" * 10 + "beef"


def _selected(n: int = 12, shift: float = 0.0) -> pl.DataFrame:
    """A select_samples table: content, metadata, the per-signal columns, keep and reason."""
    values = [(i - 4) / 4 + shift for i in range(n)]
    suspect = [abs(v) * 2 for v in values]
    return pl.DataFrame({
        "id": [f"id{i:02d}" for i in range(n)], "kind": ["prompt_response"] * n,
        "prompt": [f"prompt {i}" for i in range(n)], "response": [f"response {i}" for i in range(n)],
        "messages": [None] * n, "text": [None] * n, "source": ["/data/train.jsonl"] * n, "row": list(range(n)),
        "family": ["ab"[i % 2] for i in range(n)],
        "value": values, "nearest_ids": [["v1", "v2"]] * n, "nearest_values": [[0.1, 0.2]] * n,
        "n_tokens": [10 + i for i in range(n)], "truncated": [False] * n, "mean_loss": [2.0] * n,
        "self_influence": [0.5] * n, "suspect": suspect, "fault": ["cut"] * n,
        "suspect_reason": ["the answer stops before it is finished"] * n,
        "valset": ["grammars@v2"] * n, "model_fp": ["f" * 64] * n,
        "keep": [s <= 2.0 for s in suspect],
        "reason": ["" if s <= 2.0 else f"the answer stops before it is finished (cut: suspect {s:.3g} > 2)"
                   for s in suspect],
    })


def _publish(root, selected: pl.DataFrame, passed: bool = True) -> dict:
    data, scores = release_frames(selected)
    policy = {"policy": "suspect", "aggregate": "mean", "suspect_threshold": 2.0}
    counts = {"rows": 14, "kept": 12, "quarantined": 2, "dataset_rows": 12, "dataset_quarantined": 2,
              "scored": selected.height, "truncated": 1, "unscored": 0}
    dropped = {"suspect > 2: mean_loss high": int((~selected["keep"]).sum())}
    return publish_release(root, NAME, data, scores=scores, dropped=dropped, run_id="run-7",
                           inputs=[{"source": "/data/train.jsonl", "sha256": SHA}], model_fp="f" * 64,
                           valset="grammars@v2", policy=policy, thresholds={"min_retained_fraction": 0.25},
                           gate={"passed": passed, "failures": [] if passed else ["retained 0.1 < 0.25"]},
                           counts=counts, settings={"model": {"name": "tiny-test-model"}})


def test_release_sources_are_relative_to_their_common_folder():
    from valuegate.dataset_card import relative_sources

    assert relative_sources(["/d/a/x.jsonl", "/d/b/y.jsonl", None]) == ["a/x.jsonl", "b/y.jsonl", None]
    assert relative_sources(["/d/a/x.jsonl", "/d/a/x.jsonl"]) == ["x.jsonl", "x.jsonl"]


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_load_dataset_on_a_release_dir_returns_the_kept_rows_and_its_card(tmp_path):
    selected = _selected()
    out = _publish(tmp_path, selected)
    rdir = store.release_dir(tmp_path, NAME, out["version"])
    manifest = store.read_manifest(tmp_path, NAME, out["version"])
    assert CARD_FILE in manifest["files"]  # written before the manifest, listed in it

    # data.parquet: the training columns of the kept rows; the per-signal columns only in scores.parquet
    # (issue 28) without the sample fields no kept row uses (messages, text) and without the absolute path
    data_cols = pq.read_schema(rdir / "data.parquet").names
    assert data_cols == ["id", "kind", "prompt", "response", "source", "row", "family", "value"]
    assert set(pl.read_parquet(rdir / "data.parquet")["source"].to_list()) == {"train.jsonl"}
    scores = store.read_release_scores(tmp_path, NAME, out["version"])
    assert {*score_columns()[:8], "reason", "kept"} <= set(scores.columns) and scores.height == selected.height
    assert scores.filter(~pl.col("kept"))["reason"].str.starts_with("the answer stops").all()

    ds = datasets.load_dataset(str(rdir), cache_dir=str(tmp_path / "hf-cache"))
    assert list(ds) == ["train"]  # only data.parquet: not scores.parquet, not the gate's Data Docs
    kept_ids = pl.read_parquet(rdir / "data.parquet")["id"].to_list()
    assert ds["train"]["id"] == kept_ids == selected.filter("keep")["id"].to_list()
    assert ds["train"].column_names == data_cols and ds["train"]["family"] == selected.filter("keep")["family"].to_list()

    card_text = (rdir / CARD_FILE).read_text(encoding="utf-8")
    header = _header(card_text)
    assert header["configs"] == [{"config_name": "default",
                                  "data_files": [{"split": "train", "path": "data.parquet"}]}]
    assert "license" not in header  # none configured: none claimed
    assert header["dataset_info"]["splits"] == [{"name": "train", "num_examples": len(kept_ids)}]
    assert [f["name"] for f in header["dataset_info"]["features"]] == data_cols
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(rdir / CARD_FILE)
    assert card.data.configs[0]["config_name"] == "default"
    body = card.text
    for said in (SHA, "/data/train.jsonl", "grammars@v2", "f" * 64, "tiny-test-model", "select.policy",
                 "suspect_threshold", "gate.min_retained_fraction", "**passed**", "run-7",
                 "| ingested rows | 14 |", "| quarantined rows | 2 |", f"| scored | {selected.height} |",
                 f"| kept (data.parquet) | {len(kept_ids)} |", "| truncated at max_length | 1 |",
                 "| not scored | 0 |", "| suspect > 2: mean_loss high | ", "scores.parquet"):
        assert said in body, said


def test_a_failed_gate_says_so_on_the_card_and_the_suspect_diff_reads_scores(tmp_path):
    _publish(tmp_path, _selected())
    out = _publish(tmp_path, _selected(shift=0.5), passed=False)
    card = (store.release_dir(tmp_path, NAME, out["version"]) / CARD_FILE).read_text(encoding="utf-8")
    assert "**FAILED**: retained 0.1 < 0.25" in card
    # data.parquet has no suspect column any more: the diff of two suspect releases reads scores.parquet
    d = diff_releases(tmp_path, NAME, "v0001", out["version"])
    assert d["measure"] == "suspect" and d["entered"]["count"] + d["left"]["count"] > 0
    assert all(ex["old_value"] is not None and ex["new_value"] is not None
               for side in ("entered", "left") for info in d[side]["reasons"].values() for ex in info["examples"])


def test_card_features_are_what_datasets_reads_from_the_arrow_schema(tmp_path):
    from datasets import Features

    data = pl.DataFrame({
        "id": ["a", "b"], "value": [0.5, None],
        "kind": pl.Series(["pr", "chat"], dtype=pl.Categorical),
        "messages": [[{"role": "user", "content": "hi"}], []],
        "images": [["h1"], []], "n": pl.Series([3, 4], dtype=pl.Int32), "flag": [True, False],
        "vec": pl.Series([[1.0, 2.0], [3.0, 4.0]], dtype=pl.Array(pl.Float32, 2)),
        "nested": [[[1, 2]], [[3]]], "meta": [{"a": 1, "b": ["x"]}, {"a": 2, "b": []}],
        "at": pl.Series([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * 2),
        "day": [dt.date(2026, 1, 1)] * 2, "blob": [b"\x00", b"\x01"],
    })
    out = publish_release(tmp_path, NAME, data, run_id="r", inputs=[{"source": "x", "sha256": SHA}],
                          model_fp="f", valset="v@v1", policy={"policy": "keep_all"}, thresholds={},
                          gate={"passed": True}, counts={}, settings={})
    rdir = store.release_dir(tmp_path, NAME, out["version"])
    written = pq.read_schema(rdir / "data.parquet")
    assert card_features(written) == Features.from_arrow_schema(written)._to_yaml_list()
    assert _header((rdir / CARD_FILE).read_text())["dataset_info"]["features"] == card_features(written)
    ds = datasets.load_dataset(str(rdir), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds["messages"] == [[{"role": "user", "content": "hi"}], []] and ds["kind"] == ["pr", "chat"]
