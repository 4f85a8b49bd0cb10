"""The embedded default model (SmolLM2-135M-Instruct) end to end: alias resolution, scoring, and the exact
path against autograd on the real model. Needs the cache that `make model` (part of `make test`) fills."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from tiny import autograd_head_gradient

from valuegate.default_model import default_model_cached, default_model_dir
from valuegate.engine.extraction import extract_token_blocks
from valuegate.engine.forvalue import exact_cross
from valuegate.engine.model import encode_samples, load_model
from valuegate.file_scoring import score_files
from valuegate.settings import ModelSettings, load_settings

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(not default_model_cached(),
                       reason=f"embedded default model not in the cache ({default_model_dir()}); run `make model`"),
]

TRAIN = [
    {"prompt": "Add the numbers: 12 + 30 =", "response": " 42", "kind": "good"},
    {"prompt": "Add the numbers: 21 + 14 =", "response": " 35", "kind": "good"},
    {"prompt": "Add the numbers: 40 + 19 =", "response": " purple elephant", "kind": "bad"},
    {"prompt": "What is the capital of France? Answer:", "response": " Paris", "kind": "other"},
]
VALID = [
    {"prompt": "Add the numbers: 33 + 11 =", "response": " 44"},
    {"prompt": "Add the numbers: 25 + 25 =", "response": " 50"},
]


@pytest.fixture(scope="module")
def lm():
    return load_model(ModelSettings(device="cpu"))


def test_alias_resolves_to_the_cached_model(lm):
    assert lm.name == str(default_model_dir())
    assert (lm.vocab_size, lm.hidden_size) == (49152, 576)
    assert lm.tokenizer.chat_template


def test_scores_on_the_default_model(lm, tmp_path):
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    pl.DataFrame(TRAIN).write_ndjson(train)
    pl.DataFrame(VALID).write_ndjson(valid)
    out = {}
    for method in ("exact", "sparse"):
        settings = load_settings(overrides={"score": {"method": method, "aggregate": "pairwise"},
                                            "model": {"device": "cpu"}})
        _, report = score_files(str(train), str(valid), settings, progress=False, lm=lm)
        vm = report.matrix
        assert np.isfinite(vm.values).all()
        # the nonsense answer is the one the model finds least likely
        assert int(np.argmax(vm.train_loss)) == 2 and vm.train_loss.min() > 0
        out[method] = vm.values
    # the sparse defaults rank these pairs like exact, and agree on the sign of the dominant ones (on
    # 2-3 token responses a small pair can flip: the support leaves out ~30% of the probability mass)
    a, b = out["exact"].ravel(), out["sparse"].ravel()
    # 8 pairs make a coarse rank correlation (0.76 measured); the fidelity benchmark is the real measure
    # (Spearman >= 0.98 over 900 x 100 pairs per set at these defaults)
    assert np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1] > 0.7
    big = np.abs(a) >= 0.5 * np.abs(a).max()
    assert np.array_equal(np.sign(a[big]), np.sign(b[big]))


def test_exact_matches_autograd_on_the_default_model(lm):
    """Φ·Φ' from one forward pass equals the Frobenius product of autograd LM-head gradients."""
    settings = load_settings(overrides={"model": {"device": "cpu"}})
    rows = pl.DataFrame(TRAIN[:3])
    from valuegate.inputs.rows import samples_from_frame

    samples = samples_from_frame(rows, "mem")
    enc = encode_samples(lm.tokenizer, samples, "all", 64)
    block = extract_token_blocks(lm, enc, settings.extract, progress=False)
    got = exact_cross(block, block).numpy()
    grads = [autograd_head_gradient(lm.model, e.input_ids, e.counted).reshape(-1) for e in enc]
    ref = (torch.stack(grads) @ torch.stack(grads).T).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
