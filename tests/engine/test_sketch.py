"""Count sketches of sparse rows (valuegate.engine.sketch)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from valuegate.engine.sketch import count_sketch

VOCAB = 12


def test_count_sketch_keeps_inner_products_of_sparse_rows():
    """Exact when no two used columns share a bucket (true for this seed and width: checked), the same
    sketch for the same seed, and unbiased-size output for a narrow sketch."""
    m = sp.random(30, VOCAB * 64, density=0.005, format="csr", random_state=7, dtype=np.float32)
    exact = (m @ m.T).toarray()
    dim = 1 << 16
    used = np.unique(m.indices)
    marks = count_sketch(sp.csr_matrix((np.ones(used.size), used, [0, used.size]), shape=(1, m.shape[1])),
                                dim)
    assert np.count_nonzero(marks) == used.size  # no collision among the used columns
    sk = count_sketch(m, dim)
    np.testing.assert_allclose(sk.astype(np.float64) @ sk.T, exact, rtol=1e-5, atol=1e-6)
    assert np.array_equal(sk, count_sketch(m, dim))
    small = count_sketch(m, 8, seed=3)
    assert small.shape == (30, 8) and np.isfinite(small).all()
