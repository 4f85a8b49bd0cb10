"""One scorer: in-memory features through the store's chunk scorer (``valuegate score``) against the dense
oracle (:mod:`valuegate.engine.oracle`) on the same features, every aggregate, signals on and off."""

from __future__ import annotations

import numpy as np
import pytest
from test_forvalue import _setup

from valuegate.engine.extraction import extract_sparse
from valuegate.engine.memory_scoring import memory_context, score_memory
from valuegate.engine.model import encode_samples
from valuegate.engine.oracle import chunk_of_matrix, compute_values


def _features(settings, lm, samples):
    ex = settings.extract
    enc = encode_samples(lm.tokenizer, samples, ex.loss_on, ex.max_length, ex.truncation, ex.template)
    return extract_sparse(lm, enc, ex, samples, 1.0, False)


@pytest.mark.parametrize("signals", [True, False])
@pytest.mark.parametrize("aggregate", ["mean", "nearest"])
@pytest.mark.parametrize("how", ["none", "length", "cosine"])
def test_chunk_scorer_on_memory_features_equals_the_dense_matrix(tiny_model_dir, signals, aggregate, how):
    """The chunk scorer values in-memory features as the dense sparse matrix aggregated does: the same
    numbers with the signals (the same products), within float rounding without them (``mean`` through one
    weighted validation vector, never the ``(n, m)`` matrix; ``nearest`` by token groups: float32 block
    products)."""
    settings, lm, train, valid = _setup(tiny_model_dir(), n_train=9, n_valid=5, support_k=6, hidden_dim=8)
    settings.score.signals, settings.score.aggregate, settings.score.normalize = signals, aggregate, how
    settings.score.nearest_k = 2
    ref = chunk_of_matrix(compute_values(lm, train, valid, settings, progress=False), settings.score)
    ft, fv = _features(settings, lm, train), _features(settings, lm, valid)
    got, rows = score_memory(memory_context(fv, settings, lm.hidden_size, lm.vocab_size), ft, settings,
                             lm.vocab_size)
    np.testing.assert_array_equal(rows.tokens, [f.n_tokens for f in ft])
    if signals:
        np.testing.assert_array_equal(got.value, ref.value)
        np.testing.assert_array_equal(got.nearest, ref.nearest)
        np.testing.assert_array_equal(got.self_influence, ref.self_influence)
        assert got.signals.keys() == ref.signals.keys()
        for name, col in ref.signals.items():
            np.testing.assert_array_equal(got.signals[name], col, err_msg=name)
        return
    tol = {"rtol": 1e-6, "atol": 1e-9 * np.abs(ref.nearest_values).max()}  # float32 products and sums
    np.testing.assert_allclose(got.value, ref.value, **tol)
    np.testing.assert_array_equal(got.self_influence, ref.self_influence)
    if aggregate == "nearest":
        np.testing.assert_array_equal(got.nearest, ref.nearest)
        np.testing.assert_allclose(got.nearest_values, ref.nearest_values, **tol)
    else:
        assert got.nearest is None  # one weighted vector: no pairwise matrix, no nearest rows
