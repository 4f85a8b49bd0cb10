"""A validation set too small to be a reference for the suspect score is a one-line error naming it, never
an absurd score that passes the gate (issue 15, point 8: two samples gave suspect = 5.9e13)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import random_rows, write_jsonl

from valuegate.engine.faults import FaultReference
from valuegate.engine.signals import MIN_REFERENCE
from valuegate.errors import ValuegateError
from valuegate.file_scoring import score_files
from valuegate.settings import load_settings
from valuegate.storage import samples as sstore
from valuegate.storage.lance import Workspace
from valuegate.tasks.ingest import ingest_file
from valuegate.tasks.score import score_dataset
from valuegate.tasks.validation_set import register_valset


def _settings(model_dir, uri: str | None = None, **score):
    return load_settings(overrides={"model": {"name": str(model_dir), "device": "cpu"},
                                    "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8},
                                    "score": score, **({"workspace": uri} if uri else {})})


def test_two_validation_samples_are_refused_naming_the_file(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", random_rows(8, seed=51))
    valid = write_jsonl(tmp_path / "valid.jsonl", random_rows(2, seed=52))
    with pytest.raises(ValuegateError, match=rf"valid\.jsonl: 2 validation samples; the suspect score needs "
                                             rf"at least {MIN_REFERENCE}"):
        score_files(str(train), str(valid), _settings(tiny_model_dir()), progress=False)
    # without the signals nothing needs a reference: the values alone are computed
    df, _ = score_files(str(train), str(valid), _settings(tiny_model_dir(), signals=False), progress=False)
    assert df.height == 8 and np.isfinite(df["value"].to_numpy()).all()


def test_two_validation_samples_are_refused_naming_the_valset(tmp_path, tiny_model_dir):
    ws = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(ws)
    ingest_file(ws, "d", write_jsonl(tmp_path / "t.jsonl", random_rows(8, seed=53)), 10_000)
    register_valset(ws, "v", str(write_jsonl(tmp_path / "v.jsonl", random_rows(2, seed=54))), 10_000)
    with pytest.raises(ValuegateError, match=r"v@v1: 2 validation samples"):
        score_dataset(ws, "d", "v", _settings(tiny_model_dir(), ws.uri), progress=False)


def test_smallest_reference_gives_finite_modest_suspect_scores(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", random_rows(8, seed=55))
    valid = write_jsonl(tmp_path / "valid.jsonl", random_rows(MIN_REFERENCE, seed=56))
    df, _ = score_files(str(train), str(valid), _settings(tiny_model_dir()), progress=False)
    suspect = df["suspect"].to_numpy()
    assert np.isfinite(suspect).all() and np.abs(suspect).max() < 1e6


def test_a_spread_of_rounding_noise_is_no_scale():
    """A pool whose statistic is equal up to rounding has no spread: the scale falls back to 1 instead of
    dividing by ~1e-16, so a row far from it gets a finite, modest score."""
    hidden = np.eye(4)[[0, 1, 2, 3, 0, 1]] + 0.01
    loss = np.array([0.5, 0.5 + 1e-16, 0.5, 0.5, 0.5 - 1e-16, 0.5])
    ref = FaultReference.build({"hard_mean_loss": loss, "mean_loss": 0 * loss}, hidden, ["garbled"], 3)
    out = ref.scores({"hard_mean_loss": np.array([0.5, 3.0]), "mean_loss": 0 * np.array([0.5, 3.0])}, hidden[:2])["garbled"]
    assert np.isfinite(out).all() and out.max() < 10 and out[0] == 0.0
