"""The ``nearest`` aggregate by candidates (issue 19, valuegate.engine.candidates): count-sketch candidates
then exact rescoring of only those pairs equals the exhaustive nearest when every validation sample is a
candidate, finds the exact top k when there are fewer, under every normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from valuegate.engine.aggregate import (
    aggregate,
    block_inner_products,
    build_context,
    mean_aggregate,
    score_chunk,
)
from valuegate.engine.candidates import BlockRows, CandidateSide, candidate_values, top_candidates
from valuegate.engine.forvalue import sparse_cross_csr
from valuegate.engine.oracle import ValueMatrix, normalize
from valuegate.engine.quantize import quantize_rows
from valuegate.engine.sketch import count_sketch
from valuegate.settings import load_settings

VOCAB, WIDTH = 60, 4


def block_csr(rng: np.random.Generator, n: int, centres: np.ndarray | None = None, noise: float = 1.0,
              vocab: int = VOCAB, width: int = WIDTH) -> sp.csr_matrix:
    """``n`` feature-like rows: each a random support (some empty) of blocks of ``width`` floats. With
    ``centres`` ``(k, vocab, width)`` row ``i`` is ``centres[i % k]`` on its support plus noise (clusters)."""
    data, indices, indptr = [], [], [0]
    for i in range(n):
        size = int(rng.integers(0, 12)) if centres is None else int(rng.integers(8, 16))
        pool = np.arange(vocab) if centres is None else np.flatnonzero(np.abs(centres[i % len(centres)]).sum(1))
        sup = np.sort(rng.choice(pool, size=min(size, pool.size), replace=False))
        block = rng.normal(size=(sup.size, width)) * noise
        if centres is not None:
            block += centres[i % len(centres)][sup]
        indices.append((sup[:, None] * width + np.arange(width)).reshape(-1))
        data.append(block.reshape(-1))
        indptr.append(indptr[-1] + sup.size * width)
    return sp.csr_matrix((np.concatenate(data).astype(np.float32), np.concatenate(indices), indptr),
                         shape=(n, vocab * width))


def _settings(**score):
    return load_settings(overrides={"score": {"signals": False, **score}})


def _context(settings, vm: sp.csr_matrix):
    n_v = vm.shape[0]
    v_self = np.asarray(vm.multiply(vm).sum(1), dtype=np.float64).reshape(-1)
    v_tok = np.arange(n_v) % 5 + 1
    return build_context([f"v{j}" for j in range(n_v)], v_self, v_tok, np.ones((n_v, 3)), settings, 3, VOCAB,
                         vm=vm, width=WIDTH)


def _train_cols(tm: sp.csr_matrix):
    n = tm.shape[0]
    t_self = np.asarray(tm.multiply(tm).sum(1), dtype=np.float64).reshape(-1)
    return t_self, np.arange(n) % 7 + 1, np.zeros(n), np.zeros((n, 3))


def test_candidate_values_are_the_exact_values_of_the_pairs():
    rng = np.random.default_rng(0)
    tm, vm = block_csr(rng, 40), block_csr(rng, 25)
    exact = sparse_cross_csr(tm, vm)
    side = CandidateSide.build(vm, WIDTH)
    cand = np.stack([rng.choice(25, size=7, replace=False) for _ in range(40)])
    got = candidate_values(BlockRows.from_csr(tm, WIDTH), side, cand)
    np.testing.assert_allclose(got, np.take_along_axis(exact, cand, 1), rtol=1e-5, atol=1e-5)
    # the same blocks straight from the stored columns (support sizes, tokens, float16 rows), no CSR
    stored = BlockRows.from_arrays(np.diff(tm.indptr) // WIDTH, tm.indices[::WIDTH] // WIDTH,
                                   tm.data.astype(np.float16), WIDTH)
    np.testing.assert_allclose(candidate_values(stored, side, cand), got, rtol=2e-3, atol=2e-3)
    # a matrix not laid out in whole blocks is taken entry by entry: the same values
    odd = sp.random(40, VOCAB * WIDTH, density=0.05, format="csr", random_state=3, dtype=np.float32)
    assert BlockRows.from_csr(odd, WIDTH).width == 1
    got = candidate_values(BlockRows.from_csr(odd, WIDTH), CandidateSide.build(vm, 1), cand)
    np.testing.assert_allclose(got, np.take_along_axis(sparse_cross_csr(odd, vm), cand, 1), rtol=1e-5, atol=1e-5)
    # the lookup by sorted keys (a validation side too large for the dense table) finds the same blocks
    import valuegate.engine.candidates as cmod

    big = CandidateSide.build(vm, WIDTH)
    old = cmod._TABLE_MAX
    try:
        cmod._TABLE_MAX = 0
        keyed = CandidateSide.build(vm, WIDTH)
    finally:
        cmod._TABLE_MAX = old
    assert keyed.table is None and big.table is not None
    np.testing.assert_array_equal(candidate_values(BlockRows.from_csr(tm, WIDTH), keyed, cand),
                                  candidate_values(BlockRows.from_csr(tm, WIDTH), big, cand))


@pytest.mark.parametrize("how", ["none", "length", "cosine"])
def test_nearest_with_every_sample_a_candidate_equals_the_exhaustive_nearest(how):
    rng = np.random.default_rng(1)
    tm, vm = block_csr(rng, 50), block_csr(rng, 20)
    exhaustive = _settings(aggregate="nearest", nearest_k=3, normalize=how, nearest_candidates=0)
    ref = score_chunk(_context(exhaustive, vm), exhaustive.score, *_train_cols(tm), train_csr=tm)
    for c in (20, 500):  # C = n_valid and C > n_valid: all candidates, rescored
        s = _settings(aggregate="nearest", nearest_k=3, normalize=how, nearest_candidates=c)
        ctx = _context(s, vm)
        assert ctx.cand is not None and ctx.cand.sketch is None
        got = score_chunk(ctx, s.score, *_train_cols(tm), train_csr=tm)
        np.testing.assert_array_equal(got.nearest, ref.nearest)
        np.testing.assert_allclose(got.nearest_values, ref.nearest_values, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.value, ref.value, rtol=1e-5, atol=1e-7)
    # the exhaustive path is the oracle: aggregate of the normalised full matrix
    t_self, t_tok, _, _ = _train_cols(tm)
    ctx = _context(exhaustive, vm)
    full = normalize(ValueMatrix(sparse_cross_csr(tm, vm), t_self, ctx.v_self, t_tok, ctx.v_tok, t_tok * 0.0), how)
    np.testing.assert_array_equal(ref.nearest, aggregate(full, "nearest", 3)[1])


@pytest.mark.parametrize("how", ["none", "length", "cosine"])
def test_candidates_by_sketch_hold_the_exact_top_k(how):
    """Clustered rows (as real ones: samples of one task share tokens and directions), 240 validation
    samples, 20 candidates: the recall of the exact top 5 is at least 0.99."""
    rng = np.random.default_rng(2)
    centres = np.zeros((12, VOCAB, WIDTH))
    for c in centres:
        c[rng.choice(VOCAB, size=20, replace=False)] = rng.normal(size=(20, WIDTH)) * 2
    tm, vm = block_csr(rng, 120, centres), block_csr(rng, 240, centres)
    exhaustive = _settings(aggregate="nearest", nearest_k=5, normalize=how, nearest_candidates=0)
    ref = score_chunk(_context(exhaustive, vm), exhaustive.score, *_train_cols(tm), train_csr=tm)
    s = _settings(aggregate="nearest", nearest_k=5, normalize=how, nearest_candidates=20)
    ctx = _context(s, vm)
    assert ctx.cand.sketch.shape == (240, 256)  # extract.sketch_dim, sketched here (no stored column)
    got = score_chunk(ctx, s.score, *_train_cols(tm), train_csr=tm)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got.nearest, ref.nearest, strict=True)])
    assert recall >= 0.99, recall
    hit = (got.nearest == ref.nearest).all(1)  # where the top 5 is found, its values are the exact ones
    np.testing.assert_allclose(got.nearest_values[hit], ref.nearest_values[hit], rtol=1e-5, atol=1e-7)
    # stored sketches (as the feature table's column) give the same candidates as sketching here
    stored = score_chunk(ctx, s.score, *_train_cols(tm), train_csr=tm,
                         t_sketch=count_sketch(tm, 256, seed=s.extract.seed).astype(np.float16))
    assert np.mean(stored.nearest == got.nearest) > 0.95


def test_top_candidates_are_the_largest_sketch_products():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(9, 16)), rng.normal(size=(30, 16))
    top = top_candidates(a, b, 5)
    s = a.astype(np.float32) @ b.T.astype(np.float32)
    for i in range(9):
        assert list(top[i]) == sorted(np.argsort(-s[i])[:5])
    assert top_candidates(a, b, 40).shape == (9, 30)


@pytest.mark.parametrize("how", ["none", "length", "cosine"])
def test_mean_by_streamed_blocks_equals_the_csr_mean(how):
    """The streaming scan's per-batch product (block_inner_products of the stored int8 steps and their
    scales with the context's weighted validation vector, float32) equals mean_aggregate on the CSR of the
    rows those steps stand for (the readers' float32 rows) within the vector's float32 rounding, and the
    chunked path's product with the same vector to 1e-12; float rows without scales give the same."""
    rng = np.random.default_rng(5)
    tm, vm = block_csr(rng, 30), block_csr(rng, 11)
    s = _settings(aggregate="mean", normalize=how)
    ctx = _context(s, vm)
    t_self, t_tok, t_loss, t_hidden = _train_cols(tm)
    ref = mean_aggregate(tm, vm, t_self, ctx.v_self, t_tok, ctx.v_tok, how)
    lengths = np.diff(tm.indptr) // WIDTH
    q, scales, rounded = quantize_rows(tm.data.reshape(-1, WIDTH))
    stored = tm.copy()
    stored.data = rounded.reshape(-1)
    want = mean_aggregate(stored, vm, t_self, ctx.v_self, t_tok, ctx.v_tok, how)
    for rows, sc in ((q, scales), (rounded, None)):
        raw = block_inner_products(tm.indices[::WIDTH] // WIDTH, rows, lengths, ctx.v_mean, sc,
                                   blocks_per_step=7)  # several steps, the last one partial
        streamed = score_chunk(ctx, s.score, t_self, t_tok, t_loss, t_hidden, t_mean_raw=raw)
        np.testing.assert_allclose(streamed.value, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())
        chunked = score_chunk(ctx, s.score, t_self, t_tok, t_loss, t_hidden, train_csr=stored)
        np.testing.assert_allclose(streamed.value, chunked.value, rtol=1e-12, atol=1e-15)
    chunked = score_chunk(ctx, s.score, t_self, t_tok, t_loss, t_hidden, train_csr=tm)
    np.testing.assert_allclose(chunked.value, ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
