"""The stored form of the features (feature format 6, valuegate.engine.extraction.stored_features and
valuegate.engine.quantize)."""

from __future__ import annotations

import numpy as np
import pytest

from valuegate.engine.extraction import stored_features
from valuegate.engine.forvalue import SparseFeatures
from valuegate.engine.quantize import dequantize_rows, quantize_rows, stored_int8
from valuegate.errors import ValuegateError
from valuegate.settings import ExtractSettings


def _feats(rng: np.random.Generator, scale: float = 1.0) -> SparseFeatures:
    tok = np.sort(rng.choice(50, size=6, replace=False)).astype(np.int32)
    rows = (rng.standard_normal((6, 4)) * scale).astype(np.float32)
    hard = SparseFeatures(tok[:3], rows[:3] * 0.5, 1, 2.0, 0.0, 0.0, np.zeros(3, np.float32),
                          np.zeros(0, np.float32), np.zeros(3, np.float32))
    return SparseFeatures(tok, rows, 3, 1.0, 0.0, float(np.square(rows, dtype=np.float64).sum()),
                          np.zeros(3, np.float32), np.zeros(0, np.float32), np.zeros(6, np.float32), hard)


def test_rows_rounded_self_influence_and_sketch_of_the_rounded_rows():
    rng = np.random.default_rng(3)
    feats = [_feats(rng) for _ in range(3)]
    f32 = [(f.rows.copy(), f.hard.rows.copy()) for f in feats]
    out = stored_features(feats, ExtractSettings(sketch_dim=16, seed=5))
    for f, (r, h) in zip(out, f32, strict=True):
        for got, scale, want in ((f.rows, f.rows_scale, r), (f.hard.rows, f.hard.rows_scale, h)):
            _, s, rounded = quantize_rows(want)
            assert got.dtype == np.float32 and scale.dtype == np.float32
            np.testing.assert_array_equal(got, rounded)  # the rows a reader of the stored form gets
            np.testing.assert_array_equal(scale, s)
            np.testing.assert_array_equal(scale, np.abs(want).max(1) / np.float32(127))
            assert np.all(np.abs(got - want) <= scale[:, None] / 2 * (1 + 1e-6))
        assert f.self_influence == np.square(f.rows, dtype=np.float64).sum()
        assert f.hard.self_influence == np.square(f.hard.rows, dtype=np.float64).sum()
        assert f.sketch.shape == (16,) and f.sketch.dtype == np.float16
    # the sketch of one sample does not depend on the others in the block
    alone = stored_features([_feats(np.random.default_rng(3))], ExtractSettings(sketch_dim=16, seed=5))
    np.testing.assert_array_equal(alone[0].sketch, out[0].sketch)
    assert stored_features([_feats(rng)], ExtractSettings(sketch_dim=0))[0].sketch is None


def test_rows_of_any_magnitude_are_stored_and_a_sketch_beyond_float16_is_an_error_naming_the_sample():
    """int8 steps with a float32 scale hold any finite row (float16 rows stopped at 65,504); the float16
    sketch still has float16's range."""
    big = stored_features([_feats(np.random.default_rng(1), scale=1e6)], ExtractSettings())[0]
    assert np.isfinite(big.rows).all() and np.abs(big.rows).max() > 1e5
    feats = [_feats(np.random.default_rng(0)), _feats(np.random.default_rng(1), scale=1e6)]
    with pytest.raises(ValuegateError, match=r"^sample abc: a feature sketch value \(.*\) exceeds the range of "
                                             r"the stored float16 feature sketch \(65504\); set extract.sketch_dim = 0"):
        stored_features(feats, ExtractSettings(sketch_dim=8), ["sample xyz", "sample abc"])


def test_the_mean_hidden_state_is_rounded_to_float16_and_one_beyond_its_range_is_an_error_naming_the_sample():
    """Feature format 7 stores the mean hidden state in float16; the engine keeps the same rounded values."""
    f = _feats(np.random.default_rng(4))
    f.mean_hidden = np.array([1 / 3, -2.0e4, 1e-3], np.float32)
    out = stored_features([f], ExtractSettings())[0]
    assert out.mean_hidden.dtype == np.float32
    np.testing.assert_array_equal(out.mean_hidden, np.array([1 / 3, -2.0e4, 1e-3], np.float16).astype(np.float32))
    g = _feats(np.random.default_rng(5))
    g.mean_hidden = np.array([0.0, 7e4, 1.0], np.float32)
    with pytest.raises(ValuegateError, match=r"^sample abc: a mean hidden state value \(7e\+04\) exceeds the "
                                             r"range of the stored float16 mean hidden state \(65504\)$"):
        stored_features([_feats(np.random.default_rng(6)), g], ExtractSettings(), ["sample xyz", "sample abc"])


def test_quantize_rows_round_trip_and_edge_cases():
    r = np.array([[0.0, 0.0, 0.0], [1.0, -0.5, 0.25], [-3e-30, 1e-30, 0.0]], np.float32)
    q, s, rounded = quantize_rows(r)
    assert q.dtype == np.int8 and s.tolist() == [0.0, np.float32(1.0) / np.float32(127), np.float32(3e-30) / 127]
    assert q[0].tolist() == [0, 0, 0] and q[1].tolist() == [127, -64, 32] and q[2].tolist() == [-127, 42, 0]
    np.testing.assert_array_equal(dequantize_rows(q.reshape(-1), s), rounded)
    # a writer given the rounded rows and their scales stores the same steps; without scales it rounds
    for scale in (s, None):
        q2, s2 = stored_int8(rounded.reshape(-1), 3, scale)
        np.testing.assert_array_equal(q2, q)
        np.testing.assert_array_equal(s2, s)
    assert quantize_rows(np.zeros((0, 4), np.float32))[0].shape == (0, 4)
