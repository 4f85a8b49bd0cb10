"""`valuegate init TRAIN VALID`: a commented vg.toml from the files, then `valuegate run --config vg.toml`."""

from __future__ import annotations

import os

import polars as pl
from tiny import random_rows, write_jsonl

from valuegate.cli import EXIT_USER_ERROR, main
from valuegate.settings import load_settings


def _init_and_run(capsys, monkeypatch, tmp_path, train, valid, model) -> tuple[str, object]:
    """`valuegate init` into tmp/config/vg.toml, then `valuegate run --config` from another folder."""
    cfg = tmp_path / "config" / "vg.toml"
    cfg.parent.mkdir()
    capsys.readouterr()
    assert main(["init", str(train), str(valid), "--model", str(model), "--out", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == f"valuegate run --config {cfg}"
    settings = load_settings(cfg)
    norm = os.path.normpath  # the config holds ../data/...: resolved against its folder, not normalised
    assert [norm(p) for p in settings.data.sources] == [str(train)] and norm(settings.data.valset_file) == str(valid)
    assert settings.model.name == str(model) and settings.workspace == str(cfg.parent / "valuegate-workspace")
    text = cfg.read_text()  # paths relative to the config's folder, and comments that say what each part is
    assert f'sources = ["../data/{train.name}"]' in text and sum(line.startswith("#") for line in text.splitlines()) >= 5
    for section in ("[data]", "[model]", "[select]", "[gate]", "[release]"):
        assert section in text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with capsys.disabled():  # Prefect's console handler keeps the stream it first wrote to: not capsys's
        assert main(["run", "--config", str(cfg)]) == 0
    from valuegate.storage.releases import list_releases, read_current

    ws = cfg.parent / "valuegate-workspace"
    current = read_current(ws, settings.release.name)
    assert current is not None and [m["version"] for m in list_releases(ws, settings.release.name)] == [current]
    assert not any(elsewhere.iterdir())  # nothing written where the run was started
    return err, settings


def _prompt_response_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = random_rows(24, seed=21)
    for i, r in enumerate(rows):
        r["family"] = "ab"[i % 2]  # 2 groups: the group_by column
        r["score"] = i / 10  # numeric: never a group
    train = write_jsonl(data / "my-train.jsonl", rows)  # "tag" is a string column with one value per row
    valid = write_jsonl(data / "my-valid.jsonl", random_rows(6, seed=22))
    return train, valid


def test_init_then_run_on_a_prompt_response_jsonl(prefect_harness, tmp_path, tiny_model_dir, capsys, monkeypatch):
    train, valid = _prompt_response_files(tmp_path)
    err, settings = _init_and_run(capsys, monkeypatch, tmp_path, train, valid, tiny_model_dir())
    assert settings.select.group_by == "family"
    assert (settings.data.dataset, settings.data.valset, settings.release.name) == ("my-train", "my-valid", "my-train")
    assert "prompt/response" in err and "group_by = family (2 groups: a 12, b 12)" in err


def test_init_then_run_on_a_chat_parquet(prefect_harness, tmp_path, tiny_model_dir, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    rows = random_rows(30, seed=31, kind="messages")
    for i, r in enumerate(rows):
        r["source"] = ["forum", "docs", "chat"][i % 3]
    train, valid = data / "chat.parquet", data / "chat-valid.parquet"
    pl.DataFrame(rows).write_parquet(train)
    pl.DataFrame(random_rows(6, seed=32, kind="messages")).write_parquet(valid)
    err, settings = _init_and_run(capsys, monkeypatch, tmp_path, train, valid, tiny_model_dir())
    assert settings.select.group_by == "source" and "chat (OpenAI messages)" in err


def _error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == EXIT_USER_ERROR
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("valuegate: error: "), err
    return lines[0]


def test_wrong_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    train, valid = _prompt_response_files(tmp_path)
    cfg = tmp_path / "vg.toml"
    nofields = write_jsonl(tmp_path / "q.jsonl", [{"left": "w1", "right": "w2"}])
    err = _error(capsys, "init", str(nofields), str(valid), "--out", str(cfg))
    assert f"{nofields}: no sample fields" in err and "['left', 'right']" in err and "--field prompt=COLUMN" in err
    err = _error(capsys, "init", str(train), str(tmp_path / "missing.jsonl"), "--out", str(cfg))
    assert "missing.jsonl: no such file" in err
    txt = tmp_path / "rows.txt"
    txt.write_text(train.read_text())
    err = _error(capsys, "init", str(txt), str(valid), "--out", str(cfg))
    assert "unsupported file type .txt" in err and "looks like JSON lines" in err and "rows.jsonl" in err
    badrows = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "w1", "response": ["w2"]}] * 3)
    err = _error(capsys, "init", str(badrows), str(valid), "--out", str(cfg))
    assert "no usable row" in err and "row 0: response: expected a string" in err
    err = _error(capsys, "init", str(train), str(valid), "--out", str(tmp_path / "no-dir" / "vg.toml"))
    assert "no-dir does not exist" in err
    assert not cfg.exists()
    # an existing file is never overwritten without --force
    cfg.write_text("# mine\n")
    err = _error(capsys, "init", str(train), str(valid), "--out", str(cfg))
    assert "exists" in err and "--force" in err and cfg.read_text() == "# mine\n"
    assert main(["init", str(train), str(valid), "--out", str(cfg), "--force"]) == 0
    assert load_settings(cfg).select.group_by == "family"


def test_no_group_column_is_said_and_left_unset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "t.jsonl", random_rows(12, seed=3, kind="text"))
    rows = random_rows(12, seed=4, kind="text")
    for i, r in enumerate(rows):
        r["lang"] = f"l{i}"  # 12 values in 12 rows: no groups
    write_jsonl(tmp_path / "v.jsonl", rows)
    capsys.readouterr()
    assert main(["init", "t.jsonl", "v.jsonl"]) == 0  # default --out vg.toml, default model
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == "valuegate run --config vg.toml"
    assert "no group_by" in err and "text" in err
    s = load_settings(tmp_path / "vg.toml")
    assert s.select.group_by is None and s.model.name == "smollm2-135m" and s.data.valset == "v"
    assert "# group_by = " in (tmp_path / "vg.toml").read_text()
    assert s.data.sources == [str(tmp_path / "t.jsonl")]
