"""IFD's extra pass runs only when something reads it (``extract.unconditional``, issue 29); one loaded model
serves repeated ``valuegate.score`` calls in a process."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import random_rows, write_jsonl

import valuegate
from valuegate.engine.model_cache import clear_model_cache, model_loads
from valuegate.run_summary import summary_lines
from valuegate.settings import Settings, load_settings, needs_unconditional
from valuegate.storage import features as fstore


def _settings(**sections) -> Settings:
    return load_settings(None, sections)


@pytest.mark.parametrize(("sections", "expected"), [
    ({}, True),  # the defaults: the value signals and the suspect policy
    ({"score": {"signals": False}, "select": {"policy": "top_fraction"}}, False),
    ({"score": {"signals": False}, "select": {"policy": "ifd"}}, True),
    ({"score": {"signals": False}, "select": {"policy": "suspect"}}, True),
    ({"score": {"signals": True}, "select": {"policy": "keep_all"}}, True),
    ({"score": {"signals": False}, "select": {"policy": "keep_all"}, "extract": {"unconditional": "always"}}, True),
    ({"extract": {"unconditional": "never"}}, False),
    ({"select": {"policy": "ifd"}, "extract": {"unconditional": "never"}}, False),
])
def test_auto_runs_the_pass_when_something_reads_it(sections, expected):
    assert needs_unconditional(_settings(**sections)) is expected


def test_a_bad_choice_is_one_line():
    with pytest.raises(valuegate.ValuegateError, match="unconditional"):
        _settings(extract={"unconditional": "sometimes"})


def test_extract_without_the_pass_stores_null_and_another_fingerprint(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(7, seed=21))
    ws = valuegate.Workspace(tmp_path / "ws", model={"name": str(tiny_model_dir()), "device": "cpu"})
    ws.ingest("d", train)
    off = ws.extract("d", extract={"unconditional": "never"})
    on = ws.extract("d", extract={"unconditional": "always"})
    auto_off = ws.extract("d", score={"signals": False}, select={"policy": "top_fraction"})
    assert off.model_fp != on.model_fp and auto_off.model_fp == off.model_fp
    assert (off.extracted, on.extracted, auto_off.extracted, auto_off.already) == (7, 7, 0, 7)
    assert not off.unconditional and on.unconditional
    ids = sorted(fstore.feature_ids(ws.store, off.model_fp))
    assert fstore.read_features(ws.store, off.model_fp, ids, ["uncond_loss"])["uncond_loss"].null_count == 7
    u = fstore.read_features(ws.store, on.model_fp, ids, ["uncond_loss"])["uncond_loss"].to_numpy(zero_copy_only=False)
    assert np.isfinite(u).all() and (u > 0).all()
    # the features are the same either way: only the unconditional loss differs
    a = fstore.read_features(ws.store, off.model_fp, ids, ["mean_loss", "self_influence"])
    b = fstore.read_features(ws.store, on.model_fp, ids, ["mean_loss", "self_influence"])
    np.testing.assert_allclose(a["mean_loss"].to_numpy(), b["mean_loss"].to_numpy(), rtol=1e-5)


def test_score_without_the_pass_has_null_ifd(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(6, seed=22))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(5, seed=23))
    model = {"name": str(tiny_model_dir()), "device": "cpu"}
    off = valuegate.score(train, valid, model=model, score={"signals": False}, select={"policy": "top_fraction"})
    on = valuegate.score(train, valid, model=model, score={"signals": False}, select={"policy": "ifd"})
    assert off["ifd"].null_count() == 6 and on["ifd"].null_count() == 0
    np.testing.assert_array_equal(off["value"].to_numpy(), on["value"].to_numpy())


def test_repeated_score_calls_load_the_model_once(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(5, seed=24))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(5, seed=25))
    clear_model_cache()
    s = _settings(model={"name": str(tiny_model_dir("llama")), "device": "cpu"})
    before = model_loads(s.model)
    first = valuegate.score(train, valid, s)
    second = valuegate.score(train, valid, s)
    assert model_loads(s.model) == before + 1  # the second call reused the loaded model
    np.testing.assert_array_equal(first["value"].to_numpy(), second["value"].to_numpy())
    other = s.model_copy(update={"model": s.model.model_copy(update={"name": str(tiny_model_dir("qwen2"))})})
    valuegate.score(train, valid, other)  # another model: loaded (and kept instead)
    assert model_loads(other.model) >= 1
    valuegate.score(train, valid, s)
    assert model_loads(s.model) == before + 2  # one model is kept: the first is loaded again


def test_run_summary_names_the_choice():
    summary = {"version": "v0001", "current": True, "previous": None, "counts": {"scored": 4}, "kept": 4,
               "report": "/tmp/r.html", "unconditional": {"setting": "auto", "ran": False}}
    lines = summary_lines(summary, "r", 64)
    assert "IFD pass (each response alone): skipped, ifd is null (extract.unconditional = auto)" in lines


def test_the_pass_run_ahead_in_windows_equals_one_pass(tmp_path, tiny_model_dir):
    """Stored ``uncond_loss`` (the pass run a window of the main batches at a time, windows growing, token
    sized batches) equals the pass over every sample at once, within float32 rounding."""
    from valuegate.engine.baselines import unconditional_losses
    from valuegate.engine.model import load_model

    rows = random_rows(30, seed=26)
    ws = valuegate.Workspace(tmp_path / "ws", model={"name": str(tiny_model_dir()), "device": "cpu"},
                             extract={"batch_size": 2, "unconditional": "always"})
    ws.ingest("d", write_jsonl(tmp_path / "t.jsonl", rows))
    rep = ws.extract("d")
    ids = sorted(fstore.feature_ids(ws.store, rep.model_fp))
    got = fstore.read_features(ws.store, rep.model_fp, ids, ["id", "uncond_loss"]).to_pylist()
    from valuegate.inputs.identity import sample_from_record
    from valuegate.storage import samples as sstore

    recs = {r["id"]: sample_from_record(r) for r in sstore.read_samples_by_id(ws.store, ids).to_pylist()}
    lm = load_model(ws.settings.model, progress=False)
    want = unconditional_losses(lm, [recs[r["id"]] for r in got], ws.settings.extract, progress=False)
    have = np.array([np.nan if r["uncond_loss"] is None else r["uncond_loss"] for r in got])
    assert len(got) == 30 and np.isfinite(have).all() and np.isfinite(want).all()
    np.testing.assert_allclose(have, want, rtol=1e-5)


def test_features_stored_before_the_setting_keep_their_fingerprint(tiny_model_dir):
    """With the pass (the defaults), the fingerprint is the one valuegate used before the setting existed (the
    pass always ran): a workspace extracted then is not extracted again; without it, another fingerprint."""
    from valuegate.engine.model import fingerprint_settings, load_tokenizer, model_fingerprint
    from valuegate.tasks.extract import feature_fingerprint

    s = _settings(model={"name": str(tiny_model_dir()), "device": "cpu"})
    tok = load_tokenizer(s.model)
    before = model_fingerprint(fingerprint_settings(s.model, s.extract, tok, 1.0))
    assert feature_fingerprint(s, tok, 1.0)[1] == before
    never = s.model_copy(update={"extract": s.extract.model_copy(update={"unconditional": "never"})})
    fps, fp = feature_fingerprint(never, tok, 1.0)
    assert fp != before and fps["unconditional"] is False


def test_tight_batches_cover_every_sample_once_within_the_padding_and_token_bounds():
    from valuegate.engine.baselines import tight_batches

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(2, 300, size=200)]
    batches = tight_batches(lengths, max_tokens=2000, max_padding=0.1)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        padded, real = len(b) * max(lengths[i] for i in b), sum(lengths[i] for i in b)
        assert len(b) == 1 or (padded <= 2000 and padded <= 1.1 * real)
    assert tight_batches([], 100) == []
