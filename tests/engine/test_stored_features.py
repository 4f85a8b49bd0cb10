"""The stored form of the features (feature format 5, valuegate.engine.extraction.stored_features)."""

from __future__ import annotations

import numpy as np
import pytest

from valuegate.engine.extraction import stored_features
from valuegate.engine.forvalue import SparseFeatures
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
    f32 = [f.rows.copy() for f in feats]
    out = stored_features(feats, ExtractSettings(sketch_dim=16, seed=5))
    for f, r in zip(out, f32, strict=True):
        assert f.rows.dtype == np.float16 and f.hard.rows.dtype == np.float16
        np.testing.assert_array_equal(f.rows, r.astype(np.float16))
        assert f.self_influence == np.square(f.rows, dtype=np.float64).sum()
        assert f.hard.self_influence == np.square(f.hard.rows, dtype=np.float64).sum()
        assert f.sketch.shape == (16,) and f.sketch.dtype == np.float16
    # the sketch of one sample does not depend on the others in the block
    alone = stored_features([_feats(np.random.default_rng(3))], ExtractSettings(sketch_dim=16, seed=5))
    np.testing.assert_array_equal(alone[0].sketch, out[0].sketch)
    assert stored_features([_feats(rng)], ExtractSettings(sketch_dim=0))[0].sketch is None


def test_a_row_beyond_float16_is_an_error_naming_the_sample():
    feats = [_feats(np.random.default_rng(0)), _feats(np.random.default_rng(1), scale=1e6)]
    with pytest.raises(ValuegateError, match=r"^sample abc: a feature row value \(.*\) exceeds the range of "
                                             r"the stored float16 rows \(65504\)"):
        stored_features(feats, ExtractSettings(), ["sample xyz", "sample abc"])
