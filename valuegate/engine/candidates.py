"""The ``nearest`` aggregate by candidates (issue 19): per training row the C validation rows of largest
count-sketch inner product (:mod:`valuegate.engine.sketch`), then the exact values of only those C pairs.

The exact rescoring works on the feature rows' layout: a sparse row is a list of blocks, one per support
token ``u``, of ``width`` consecutive columns ``u·width + 0…width-1`` (:class:`BlockRows`). The value of a
pair is ``Σ_{u ∈ U_i ∩ U_j} ⟨R_i[u], R_j[u]⟩``; the shared tokens are found with one lookup table of the
validation side (built once per run, :class:`CandidateSide`), so a chunk of n training rows costs
``n · C · |U|`` lookups and ``Σ_pairs |U_i ∩ U_j| · width`` multiply-adds: about C/n_valid of the
exhaustive product (:func:`valuegate.engine.forvalue.sparse_cross_csr`).

numpy only (no pyarrow, no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BlockRows", "CandidateSide", "candidate_values", "rowwise_dots", "top_candidates"]

_TABLE_MAX = 1 << 26  # entries of the dense (n_valid, validation tokens) lookup table; above: sorted keys


@dataclass
class BlockRows:
    """Sparse rows as blocks of ``width`` consecutive columns.

    Attributes:
        ptr: ``(n+1,)`` int64, the blocks of row ``i`` are ``ptr[i]:ptr[i+1]``. tok: ``(nb,)`` int64 the
            block's token (column ``// width``). data: ``(nb, width)`` float32. width: floats per block.
    """

    ptr: np.ndarray
    tok: np.ndarray
    data: np.ndarray
    width: int

    @classmethod
    def from_csr(cls, m, width: int) -> BlockRows:
        """The blocks of an ``(n, V·width)`` scipy CSR matrix. A matrix not laid out in whole blocks
        (``indptr`` or a block's columns not ``u·width + 0…width-1``) is taken with blocks of width 1
        (the same values, more lookups)."""
        indptr = np.asarray(m.indptr, dtype=np.int64)
        idx = np.asarray(m.indices, dtype=np.int64)
        if width > 1 and not (np.all(indptr % width == 0) and _whole_blocks(idx, width)):
            width = 1
        return cls(indptr // width, idx[::width] // width,
                   np.asarray(m.data, dtype=np.float32).reshape(-1, width), width)


    @classmethod
    def from_arrays(cls, lengths: np.ndarray, tok: np.ndarray, rows: np.ndarray, width: int) -> BlockRows:
        """From the stored columns of n rows: ``lengths`` ``(n,)`` support sizes, ``tok`` ``(nb,)`` their
        tokens concatenated, ``rows`` ``(nb·width,)`` their blocks (any float dtype; upcast to float32)."""
        ptr = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
        data = np.asarray(rows).astype(np.float32, copy=False).reshape(-1, width)
        if data.shape[0] != ptr[-1] or len(tok) != ptr[-1]:
            raise ValueError(f"{len(tok)} support entries and {data.shape[0]} blocks for {ptr[-1]} in the lengths")
        return cls(ptr, np.asarray(tok, dtype=np.int64), data, width)


def _whole_blocks(idx: np.ndarray, width: int) -> bool:
    if idx.size % width:
        return False
    b = idx.reshape(-1, width)
    return bool(np.all(b[:, 0] % width == 0) and np.array_equal(b - b[:, :1], np.broadcast_to(np.arange(width), b.shape)))


@dataclass
class CandidateSide:
    """The validation side of the candidate search and the rescoring, built once per run.

    Attributes:
        blocks: the validation rows' blocks. ctok: ``(V,)`` int32 compressed id of each token some
            validation row holds, else -1. table: ``(T_v, n_v)`` int32 block of row ``j`` at compressed token
            ``t`` (-1: none; token-major, so the lookups of one training row stay in a few cached rows), or
            None when too large (then ``keys``/``key_block``: the sorted ``j·T_v + t`` of every block and
            the block each names). sketch: ``(n_v, D)`` float32 count
            sketches of the rows, each scaled by the normalisation's factor of that row (so the candidate
            order is the normalised value's expected order), or None (every row is a candidate).
    """

    blocks: BlockRows
    ctok: np.ndarray
    n_tok: int
    table: np.ndarray | None
    keys: np.ndarray | None
    key_block: np.ndarray | None
    sketch: np.ndarray | None

    @property
    def n_valid(self) -> int:
        return self.blocks.ptr.size - 1

    @classmethod
    def build(cls, valid, width: int, sketch: np.ndarray | None = None,
              scale: np.ndarray | None = None) -> CandidateSide:
        """From the ``(n_v, V·width)`` CSR validation rows, their ``(n_v, D)`` sketches (None: no candidate
        search) and the ``(n_v,)`` factor of each row in the normalised value (None: 1)."""
        blocks = BlockRows.from_csr(valid, width)
        n_v = blocks.ptr.size - 1
        vocab = max(int(valid.shape[1]) // blocks.width, int(blocks.tok.max(initial=-1)) + 1)
        used = np.unique(blocks.tok)
        ctok = np.full(vocab, -1, dtype=np.int32)
        ctok[used] = np.arange(used.size, dtype=np.int32)
        row = np.repeat(np.arange(n_v, dtype=np.int64), np.diff(blocks.ptr))
        key = row * used.size + ctok[blocks.tok]
        table = keys = key_block = None
        if n_v * used.size <= _TABLE_MAX:
            table = np.full((used.size, n_v), -1, dtype=np.int32)
            table[ctok[blocks.tok], row] = np.arange(key.size, dtype=np.int32)
        else:
            order = np.argsort(key, kind="stable")
            keys, key_block = key[order], order.astype(np.int64)
        sk = None
        if sketch is not None:
            sk = np.asarray(sketch, dtype=np.float32)
            if scale is not None:
                sk = sk * np.asarray(scale, dtype=np.float32)[:, None]
        return cls(blocks, ctok, int(used.size), table, keys, key_block, sk)

    def lookup(self, rows: np.ndarray, ct: np.ndarray) -> np.ndarray:
        """The validation block of row ``rows[e]`` at compressed token ``ct[e]`` (-1: the row lacks it)."""
        if self.table is not None:
            return self.table[ct, rows].astype(np.int64)
        key = rows * self.n_tok + ct
        pos = np.minimum(np.searchsorted(self.keys, key), self.keys.size - 1)
        return np.where(self.keys[pos] == key, self.key_block[pos], -1)


def top_candidates(train_sketch: np.ndarray, valid_sketch: np.ndarray, c: int) -> np.ndarray:
    """``(n, c)`` int64 indices (ascending per row) of the ``c`` validation rows of largest sketch inner
    product with each training row: ``(n, D)`` against ``(n_v, D)``, one float32 product."""
    s = np.asarray(train_sketch, dtype=np.float32) @ np.asarray(valid_sketch, dtype=np.float32).T
    n_v = s.shape[1]
    if c >= n_v:
        return np.broadcast_to(np.arange(n_v), s.shape).copy()
    top = np.argpartition(-s, c - 1, axis=1)[:, :c]
    top.sort(axis=1)
    return top.astype(np.int64)


def rowwise_dots(a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray, batch: int = 8192) -> np.ndarray:
    """``⟨a[ia[e]], b[ib[e]]⟩`` for every e, float64, through cache-sized gathers."""
    out = np.empty(ia.size, dtype=np.float64)
    w = a.shape[1]
    x = np.empty((min(batch, ia.size), w), dtype=np.float32)
    y = np.empty_like(x)
    for lo in range(0, ia.size, batch):
        hi = min(lo + batch, ia.size)
        m = hi - lo
        np.take(a, ia[lo:hi], axis=0, out=x[:m])
        np.take(b, ib[lo:hi], axis=0, out=y[:m])
        out[lo:hi] = np.einsum("ij,ij->i", x[:m], y[:m])
    return out


def candidate_values(train: BlockRows, side: CandidateSide, cand: np.ndarray, rows_per_batch: int = 256) -> np.ndarray:
    """The exact raw values ``⟨Φ(z_i), Φ(z'_j)⟩`` of the pairs ``(i, cand[i, k])``.

    Args:
        train: the n training rows' blocks (same width as the validation side's). cand: ``(n, c)``
            validation indices.

    Returns:
        ``(n, c)`` float64 (each block product accumulated in float32, the sums in float64).
    """
    n, c = cand.shape
    out = np.zeros((n, c), dtype=np.float64)
    if n == 0 or c == 0:
        return out
    if train.width != side.blocks.width:
        raise ValueError(f"training blocks of width {train.width}, validation blocks of {side.blocks.width}")
    tok = train.tok
    ct = np.where(tok < side.ctok.size, side.ctok[np.minimum(tok, side.ctok.size - 1)], -1)
    keep = np.flatnonzero(ct >= 0)  # blocks whose token some validation row holds
    krow = np.repeat(np.arange(n), np.diff(train.ptr))[keep]
    kptr = np.concatenate([[0], np.cumsum(np.bincount(krow, minlength=n))])
    for lo in range(0, n, rows_per_batch):
        hi = min(lo + rows_per_batch, n)
        rows = np.repeat(np.arange(lo, hi), c)  # pair p = (rows[p], cand[rows[p], p % c])
        cnt = kptr[rows + 1] - kptr[rows]
        total = int(cnt.sum())
        if total == 0:
            continue
        pair = np.repeat(np.arange(rows.size), cnt)
        start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        bt = keep[np.arange(total) - np.repeat(start - kptr[rows], cnt)]
        bv = side.lookup(cand[lo:hi].reshape(-1)[pair], ct[bt].astype(np.int64))
        hit = bv >= 0
        dots = rowwise_dots(train.data, bt[hit], side.blocks.data, bv[hit])
        out[lo:hi] = np.bincount(pair[hit], weights=dots, minlength=rows.size).reshape(hi - lo, c)
    return out
