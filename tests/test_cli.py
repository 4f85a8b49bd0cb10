"""`valuegate score` end to end, its outputs, every user-error path, and settings precedence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from tiny import random_rows, write_jsonl

from valuegate.cli import EXIT_USER_ERROR, main
from valuegate.settings import load_settings


def _score(model_dir, train, valid, out, *extra):
    return main(["score", str(train), str(valid), "--model", str(model_dir), "--out", str(out), "--quiet",
                 "--device", "cpu", *extra])


def test_score_subprocess_writes_table_and_summary(tiny_model_dir, data_files, tmp_path):
    train, valid = data_files
    out = tmp_path / "scores.parquet"
    p = subprocess.run([sys.executable, "-m", "valuegate.cli", "score", str(train), str(valid), "--model",
                        str(tiny_model_dir()), "--aggregate", "nearest", "--nearest-k", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    df = pl.read_parquet(out)
    from valuegate.engine.columns import FAULT_SCORE_COLUMNS
    from valuegate.storage.schemas import SIGNAL_COLUMNS

    assert df.columns == ["prompt", "response", "tag", "row", "value", "nearest_rows", "n_tokens", "truncated",
                          "mean_loss", "self_influence", "perplexity", "length", "ifd", "rds_mean", "rds_max",
                          "suspect", "fault", "suspect_reason", *FAULT_SCORE_COLUMNS,
                          *(c for c in SIGNAL_COLUMNS if c != "mean_loss"), "keep", "reason", "reason_code"]
    assert df["suspect"].is_finite().all() and df["hard_value_mean"].is_finite().all()
    assert df["row"].to_list() == list(range(9))
    assert df["tag"].to_list() == [f"r{i}" for i in range(9)]
    assert all(len(r) == 2 and set(r) <= set(range(4)) for r in df["nearest_rows"].to_list())
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("scored 9 train × 4 validation samples (sparse, nearest") and str(out) in last


def test_pairwise_long_format_and_aggregates_agree(tiny_model_dir, data_files, tmp_path):
    train, valid = data_files
    model = tiny_model_dir()
    assert _score(model, train, valid, tmp_path / "pw.parquet", "--aggregate", "pairwise", "--method", "exact") == 0
    pw = pl.read_parquet(tmp_path / "pw.parquet")
    assert pw.columns == ["train_row", "valid_row", "value"] and pw.height == 9 * 4
    matrix = np.zeros((9, 4))
    matrix[pw["train_row"].to_numpy(), pw["valid_row"].to_numpy()] = pw["value"].to_numpy()
    assert _score(model, train, valid, tmp_path / "mean.parquet", "--method", "exact") == 0
    np.testing.assert_allclose(pl.read_parquet(tmp_path / "mean.parquet")["value"].to_numpy(), matrix.mean(1),
                               rtol=1e-9)
    assert _score(model, train, valid, tmp_path / "nn.parquet", "--method", "exact", "--aggregate", "nearest",
                  "--nearest-k", "3") == 0
    nn = pl.read_parquet(tmp_path / "nn.parquet")
    np.testing.assert_allclose(nn["value"].to_numpy(), np.sort(matrix, 1)[:, ::-1][:, :3].mean(1), rtol=1e-9)
    assert nn["nearest_rows"].to_list()[0] == list(np.argsort(-matrix[0])[:3])
    # cosine: |value| <= 1, and the self-influence column is the norm the cosine divides by
    assert _score(model, train, valid, tmp_path / "cos.parquet", "--method", "exact", "--normalize", "cosine",
                  "--aggregate", "pairwise") == 0
    cos = pl.read_parquet(tmp_path / "cos.parquet")["value"].to_numpy()
    assert np.abs(cos).max() <= 1 + 1e-9
    self_t = pl.read_parquet(tmp_path / "mean.parquet")["self_influence"].to_numpy()
    assert np.all(self_t > 0)


def _run_error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err and err.startswith("valuegate: error: ")
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_user_errors_are_one_line_and_name_file_row_field(tiny_model_dir, data_files, tmp_path, capsys):
    train, valid = data_files
    m = str(tiny_model_dir())
    out = str(tmp_path / "o.parquet")
    base = ["score", "--model", m, "--quiet", "--out", out]
    err = _run_error(capsys, *base[:1], str(tmp_path / "nope.jsonl"), str(valid), *base[1:])
    assert "nope.jsonl: no such file" in err
    nofields = write_jsonl(tmp_path / "nofields.jsonl", [{"question": "w1", "answer": "w2"}])
    assert "no sample fields" in _run_error(capsys, "score", str(nofields), str(valid), *base[1:])
    badrow = write_jsonl(tmp_path / "badrow.jsonl", [*random_rows(2, 5), {"prompt": "w1 ", "response": ""}])
    err = _run_error(capsys, "score", str(train), str(badrow), *base[1:])
    assert f"{badrow}: row 2: response: empty" in err
    nonstr = write_jsonl(tmp_path / "nonstr.jsonl", [{"prompt": "w1 ", "response": ["w2"]}])
    assert "row 0: response: expected a string (got list)" in _run_error(capsys, "score", str(nonstr), str(valid),
                                                                          *base[1:])
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "w1 " * 30, "response": "w2"}])
    err = _run_error(capsys, "score", str(long), str(valid), *base[1:], "--max-length", "16")
    assert f"{long}: row 0: response: every counted token lies beyond max_length" in err
    assert "ending in .parquet" in _run_error(capsys, "score", str(train), str(valid), "--model", m, "--out",
                                              str(tmp_path / "o.csv"))
    err = _run_error(capsys, "score", str(train), str(valid), "--model", str(tmp_path / "no-model"), "--out", out)
    assert "cannot load model" in err
    err = _run_error(capsys, "score", str(train), str(valid), "--model", m, "--out", out, "--batch-size", "0")
    assert "extract.batch_size" in err
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"prompt": "w1 ", "response": "w2", "value": 1}])
    assert "rename them" in _run_error(capsys, "score", str(clash), str(valid), *base[1:])
    assert not os.path.exists(out)


def test_error_exit_from_the_console_script_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "valuegate.cli", "score", str(tmp_path / "a.jsonl"),
                        str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o.parquet")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == EXIT_USER_ERROR
    assert p.stderr.strip() == f"valuegate: error: {tmp_path / 'a.jsonl'}: no such file"


def test_settings_precedence_file_then_env_then_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "vg.toml"
    cfg.write_text('[extract]\nbatch_size = 3\nsupport_k = 7\n[score]\nmethod = "exact"\n')
    s = load_settings(cfg)
    assert (s.extract.batch_size, s.extract.support_k, s.score.method) == (3, 7, "exact")
    monkeypatch.setenv("VALUEGATE_EXTRACT__BATCH_SIZE", "5")
    s = load_settings(cfg)
    assert (s.extract.batch_size, s.extract.support_k) == (5, 7)
    s = load_settings(cfg, {"extract": {"batch_size": 9, "support_k": None}, "score": {"aggregate": "nearest"}})
    assert (s.extract.batch_size, s.extract.support_k, s.score.method, s.score.aggregate) == (9, 7, "exact",
                                                                                              "nearest")
    cfg.write_text('[extract]\nlowest_likelihood_ratio = 1.5\n')
    with pytest.raises(Exception, match=r"extract.lowest_likelihood_ratio"):
        load_settings(cfg)


def test_chat_and_text_inputs_score(tiny_model_dir, tmp_path):
    model = tiny_model_dir("qwen2")
    chat = write_jsonl(tmp_path / "chat.jsonl", random_rows(4, 8, "messages"))
    text = write_jsonl(tmp_path / "text.jsonl", random_rows(3, 9, "text"))
    assert _score(model, chat, chat, tmp_path / "c.parquet") == 0
    assert _score(model, text, text, tmp_path / "t.parquet", "--method", "exact") == 0
    t = pl.read_parquet(tmp_path / "t.parquet")
    assert t["value"].is_finite().all()
    parquet_in = tmp_path / "chat.parquet"
    pl.DataFrame(random_rows(3, 10, "messages")).write_parquet(parquet_in)
    assert _score(model, parquet_in, chat, tmp_path / "cp.parquet") == 0
    rows = json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])
    assert pl.read_parquet(tmp_path / "c.parquet")["tag"][0] == rows["tag"]


def test_adapter_is_merged_and_changes_the_scores(tiny_model_dir, data_files, tmp_path):
    """A LoRA adapter scores exactly like the model with the adapter merged by hand."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_model_dir("llama")
    torch.manual_seed(5)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a fresh LoRA is a no-op (B = 0): make it change the model
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(merged_dir)
    train, valid = data_files
    runs = {"base": [], "adapter": ["--adapter", str(adapter)]}
    vals = {}
    for key, extra in runs.items():
        assert _score(base_dir, train, valid, tmp_path / f"{key}.parquet", "--method", "exact", *extra) == 0
        vals[key] = pl.read_parquet(tmp_path / f"{key}.parquet")["value"].to_numpy()
    assert _score(merged_dir, train, valid, tmp_path / "merged.parquet", "--method", "exact") == 0
    merged = pl.read_parquet(tmp_path / "merged.parquet")["value"].to_numpy()
    np.testing.assert_allclose(vals["adapter"], merged, rtol=1e-4, atol=1e-6 * np.abs(merged).max())
    assert not np.allclose(vals["adapter"], vals["base"], rtol=1e-2)


def test_server_help_says_how_a_run_reaches_it(capsys):
    with pytest.raises(SystemExit):
        main(["server", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PREFECT_API_URL=http://127.0.0.1:PORT/api" in text and "valuegate run --config" in text


def test_artifact_keys_are_namespaced_by_release():
    from valuegate.flows.refresh import artifact_key

    assert artifact_key("release-summary", "My_Set.v2") == "release-summary-my-set-v2"
    assert artifact_key("lowest-valued", "demo") == "lowest-valued-demo"
