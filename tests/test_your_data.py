"""Your own data (docs/your-data.md): each format from a file as its authors ship it, through `valuegate init`
and `valuegate run` (in process) to a release that `datasets` loads, from its version folder and, as the
current release, from the release name's folder (issue 28)."""

from __future__ import annotations

import csv
import json

import datasets
import polars as pl
import pytest
from tiny import random_rows

from valuegate.cli import main
from valuegate.settings import load_settings


def _pairs(n: int, seed: int) -> list[tuple[str, str]]:
    return [(r["prompt"].strip(), r["response"]) for r in random_rows(n, seed)]


def _alpaca(path, pairs):
    """One indented JSON array of instruction/input/output, as the Alpaca authors ship alpaca_data.json."""
    rows = [{"instruction": p, "input": "", "output": r} for p, r in pairs]
    path.write_text(json.dumps(rows, indent=4))
    return path


def _sharegpt(path, pairs):
    rows = [{"id": f"c{i}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}
            for i, (p, r) in enumerate(pairs)]
    path.write_text(json.dumps(rows, indent=2))
    return path


def _csv(path, pairs):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "topic"])
        w.writerows([p, r, "ab"[i % 2]] for i, (p, r) in enumerate(pairs))
    return path


def _saved(path, pairs):
    datasets.Dataset.from_list([{"instruction": p, "input": "", "output": r} for p, r in pairs]).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(("fmt", "write", "name", "said"), [
    ("alpaca", _alpaca, "{}.json", "JSON array, 24 rows, Alpaca (instruction/input/output) samples"),
    ("sharegpt", _sharegpt, "{}.json", "JSON array, 24 rows, chat (ShareGPT conversations) samples"),
    ("csv", _csv, "{}.csv", "CSV, 24 rows, prompt/response (prompt = question, response = answer) samples "
                            "(a guessed mapping: check it)"),
    ("save_to_disk", _saved, "{}", "save_to_disk folder, 24 rows, Alpaca (instruction/input/output) samples"),
])
def test_a_format_as_shipped_goes_through_init_and_run_to_a_release_datasets_loads(
        prefect_harness, tmp_path, tiny_model_dir, capsys, monkeypatch, fmt, write, name, said):
    data = tmp_path / "data"
    data.mkdir()
    train = write(data / name.format("train"), _pairs(24, 21))
    valid = write(data / name.format("valid"), _pairs(6, 22))
    cfg = tmp_path / "vg.toml"
    capsys.readouterr()
    assert main(["init", str(train), str(valid), "--model", str(tiny_model_dir()), "--out", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert said in err, err
    settings = load_settings(cfg)
    assert settings.data.fields == ({"prompt": "question", "response": "answer"} if fmt == "csv" else {})
    if fmt == "csv":
        assert "[data.fields]" in cfg.read_text() and settings.select.group_by == "topic"
    monkeypatch.chdir(tmp_path)
    with capsys.disabled():  # Prefect's console handler keeps the stream it first wrote to: not capsys's
        assert main(["run", "--config", str(cfg), "--select.policy", "keep_all", "--quiet"]) == 0

    release = tmp_path / "valuegate-workspace" / "releases" / settings.release.name
    version = (release / "CURRENT").read_text().split()[0]
    ds = datasets.load_dataset(str(release / version), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 24  # keep_all: every row (the 24 are distinct)
    content = {"messages"} if fmt == "sharegpt" else {"prompt", "response"}
    assert content <= set(ds.column_names) and not ({"prompt", "response", "messages", "text"} - content) & set(
        ds.column_names)  # no all-null sample fields
    assert set(ds["source"]) == {train.name}  # no absolute paths in the released rows
    if fmt != "sharegpt":
        assert sorted(ds["prompt"]) == sorted(p for p, _ in _pairs(24, 21))
    else:
        assert all(json.loads(m)[0]["role"] == "user" for m in ds["messages"])
    current = datasets.load_dataset(str(release), split="train", cache_dir=str(tmp_path / "hf2"))
    assert sorted(current["id"]) == sorted(ds["id"])  # the release name's folder: the current release
    import valuegate

    assert sorted(valuegate.load_release(tmp_path / "valuegate-workspace", settings.release.name)["id"].to_list()) \
        == sorted(ds["id"])
    assert pl.read_parquet(release / version / "scores.parquet").height == 24
