"""The exact value matrix by token groups (issue 19, valuegate.engine.token_products) equals the CSR
product (forvalue.sparse_cross_csr) whatever goes through BLAS and what through gathered pairs, and it
is what the signals-off exhaustive ``nearest`` aggregate computes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from test_candidates import WIDTH, _context, _settings, _train_cols, block_csr

from valuegate.engine.aggregate import score_chunk
from valuegate.engine.candidates import BlockRows
from valuegate.engine.forvalue import sparse_cross_csr
from valuegate.engine.token_products import TokenGroups, grouped_values


def zipf_csr(rng: np.random.Generator, n: int, vocab: int = 300, width: int = 8) -> sp.csr_matrix:
    """Rows whose supports are drawn Zipf-like (a few tokens in most rows, a long tail of rare ones), with
    some empty rows, like real feature rows."""
    p = 1.0 / np.arange(1, vocab + 1) ** 1.2
    p /= p.sum()
    data, indices, indptr = [], [], [0]
    for i in range(n):
        sup = np.unique(rng.choice(vocab, size=int(rng.integers(0, 25)), p=p)) if i % 7 else np.zeros(0, int)
        indices.append((sup[:, None] * width + np.arange(width)).reshape(-1))
        data.append(rng.normal(size=sup.size * width))
        indptr.append(indptr[-1] + sup.size * width)
    return sp.csr_matrix((np.concatenate(data).astype(np.float32), np.concatenate(indices).astype(np.int64),
                          indptr), shape=(n, vocab * width))


@pytest.mark.parametrize("wide_share", [0.0, 0.25, 2.0])  # every token dense, the frequent ones, none
@pytest.mark.parametrize("gemm_min", [0, 40, 10**9])  # all BLAS, mixed, all gathered pairs
@pytest.mark.parametrize("rows_per_step", [1, 17, 4096])
def test_grouped_values_equal_the_csr_product(gemm_min, rows_per_step, wide_share):
    rng = np.random.default_rng(gemm_min + rows_per_step)
    tm, vm = zipf_csr(rng, 90), zipf_csr(rng, 33)
    groups = TokenGroups.build(BlockRows.from_csr(vm, 8), 300, wide_share=wide_share)
    n_wide = {0.0: groups.count.size, 2.0: 0}.get(wide_share, int((groups.count >= 0.25 * 33).sum()))
    assert groups.wide_data.shape == (n_wide, 33, 8) and int((groups.wide >= 0).sum()) == n_wide
    assert n_wide > 0 or wide_share == 2.0  # the frequent tokens exist in these rows
    got = grouped_values(BlockRows.from_csr(tm, 8), groups, rows_per_step=rows_per_step, gemm_min=gemm_min)
    ref = sparse_cross_csr(tm, vm)
    assert got.shape == (90, 33) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.all(got[::7] == 0)  # empty rows have no value


def test_tokens_no_validation_row_holds_and_beyond_the_vocabulary_count_nothing():
    rng = np.random.default_rng(3)
    vm = zipf_csr(rng, 10, vocab=50)
    tm = zipf_csr(rng, 12, vocab=400)  # tokens 50..399: no validation row has them, and beyond V = 50
    groups = TokenGroups.build(BlockRows.from_csr(vm, 8), 50)
    got = grouped_values(BlockRows.from_csr(tm, 8), groups)
    ref = sparse_cross_csr(tm[:, :50 * 8], vm)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_width_one_blocks_and_an_empty_side():
    rng = np.random.default_rng(4)
    tm, vm = zipf_csr(rng, 20, width=1), zipf_csr(rng, 9, width=1)
    got = grouped_values(BlockRows.from_csr(tm, 1), TokenGroups.build(BlockRows.from_csr(vm, 1), 300), gemm_min=5)
    np.testing.assert_allclose(got, sparse_cross_csr(tm, vm), rtol=1e-5, atol=1e-6)
    empty = TokenGroups.build(BlockRows.from_csr(vm[:0], 1), 300)
    assert TokenGroups.build(BlockRows.from_csr(vm, 1), 300, wide_budget_mb=0).wide_data.shape[0] == 0
    assert grouped_values(BlockRows.from_csr(tm, 1), empty).shape == (20, 0)
    with pytest.raises(ValueError, match="width"):
        grouped_values(BlockRows.from_csr(zipf_csr(rng, 3, width=2), 2), TokenGroups.build(BlockRows.from_csr(vm, 1), 300))


@pytest.mark.parametrize("how", ["none", "length", "cosine"])
def test_the_exhaustive_nearest_aggregate_runs_on_token_groups_and_equals_the_csr_one(how):
    """Signals off, nearest_candidates = 0: the context holds the token groups and score_chunk's values
    equal the plain CSR path's (the context without groups), from CSR rows or from blocks."""
    rng = np.random.default_rng(9)
    vm, tm = block_csr(rng, 23), block_csr(rng, 31)
    settings = _settings(aggregate="nearest", nearest_k=3, nearest_candidates=0, normalize=how)
    ctx = _context(settings, vm)
    assert ctx.groups is not None and ctx.cand is None
    got = score_chunk(ctx, settings.score, *_train_cols(tm), train_csr=tm)
    from_blocks = score_chunk(ctx, settings.score, *_train_cols(tm), train_blocks=BlockRows.from_csr(tm, WIDTH))
    ctx.groups = None  # the CSR product
    ref = score_chunk(ctx, settings.score, *_train_cols(tm), train_csr=tm)
    for out in (got, from_blocks):
        np.testing.assert_allclose(out.value, ref.value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.nearest_values, ref.nearest_values, rtol=1e-5, atol=1e-6)
        assert (out.nearest == ref.nearest).mean() > 0.95  # float32 rounding may swap near-ties


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_top_k_is_the_stable_argsort_head_ties_included(k):
    """top_k partitions instead of sorting every row; it must give exactly the stable argsort's first k,
    ties at the k-th value broken by the lower index (integer values: many ties)."""
    from valuegate.engine.aggregate import top_k

    rng = np.random.default_rng(k)
    for values in (rng.integers(0, 4, size=(200, 12)).astype(float), rng.normal(size=(50, 30)),
                   np.zeros((3, 12)), np.zeros((0, 12))):
        ref = np.argsort(-values, axis=1, kind="stable")[:, :k]
        got = top_k(values, k)
        assert got.shape == ref.shape and np.array_equal(got, ref)
