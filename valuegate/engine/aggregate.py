"""The chunk scorer (docs/ARCHITECTURE.md §4): value a chunk of training samples against a validation side
built once, with the normalisations and aggregates over the validation set, and the value signals.

One scorer for every path: ``valuegate score`` feeds its in-memory features through it as one chunk
(:mod:`valuegate.engine.memory_scoring`), the ``score`` step feeds it stored feature rows chunk by chunk
(``tasks/score.py``). The dense ``(n_train, n_valid)`` matrix of ``exact`` and ``pairwise`` is the oracle,
:mod:`valuegate.engine.oracle`; the columns of scored chunks are :mod:`valuegate.engine.score_columns`.

torch/numpy/scipy only: reading feature rows and writing a scores run are ``tasks/score.py`` and
``storage/scores.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from valuegate.engine.candidates import BlockRows, CandidateSide, candidate_values, top_candidates
from valuegate.engine.extraction import projections
from valuegate.engine.faults import FaultReference
from valuegate.engine.forvalue import sparse_cross_csr, sparse_mean_csr
from valuegate.engine.signals import CrossTerms, SparseSet, ValidSide, cross_terms_sparse, signals_from_terms
from valuegate.engine.sketch import count_sketch
from valuegate.engine.token_products import TokenGroups, grouped_values
from valuegate.errors import ValuegateError
from valuegate.settings import Settings

__all__ = ["ChunkScores", "ScoringContext", "aggregate", "aggregates_of", "block_inner_products", "build_context",
           "mean_aggregate", "mean_finish", "mean_vector", "nearest_of_candidates", "normalized",
           "projected_centre", "score_chunk", "sketch_dim", "sparse_signal_terms", "top_k", "valid_scale"]


def projected_centre(cfg, hidden_size: int, vocab_size: int, hidden: np.ndarray,
                     n_tokens: np.ndarray) -> np.ndarray:
    """``P_h μ`` (``(width,)`` float64) for the mean validation hidden state over every counted position,
    ``μ = Σ_j n_j h̄_j / Σ_j n_j``.

    Args:
        cfg: extraction settings (projection seed and width). hidden: ``(n_v, d)`` each validation
        sample's mean hidden state ``h̄_j``. n_tokens: ``(n_v,)`` their counted positions ``n_j``.
    """
    n = np.asarray(n_tokens, dtype=np.float64)
    mu = n @ np.asarray(hidden, dtype=np.float64) / max(float(n.sum()), 1.0)
    ph, _ = projections(cfg, hidden_size, vocab_size)
    return mu if ph is None else ph.double().numpy() @ mu


def sparse_signal_terms(train: SparseSet, train_hard: SparseSet | None, vside: ValidSide,
                        k: int) -> tuple[CrossTerms, dict[str, np.ndarray]]:
    """Cross terms of the main rows and every signal (hard ones when ``train_hard`` is given)."""
    terms = cross_terms_sparse(train, vside)
    sig = signals_from_terms(terms, k)
    if train_hard is not None:
        sig.update(signals_from_terms(cross_terms_sparse(train_hard, vside), k, prefix="hard_"))
    return terms, sig


def normalized(values: np.ndarray, how: str, t_self: np.ndarray, t_tok: np.ndarray, v_self: np.ndarray,
               v_tok: np.ndarray) -> np.ndarray:
    """:func:`normalize` of raw values ``(n, m)``: ``t_self``, ``t_tok`` ``(n,)`` of the training rows;
    ``v_self``, ``v_tok`` of the validation side, ``(m,)`` (every column one validation sample) or
    ``(n, m)`` (each pair its own, e.g. the candidates of :func:`nearest_of_candidates`)."""
    if how == "none":
        return values
    if how == "length":
        return values / (np.maximum(t_tok, 1)[:, None] * np.maximum(v_tok, 1))
    if how == "cosine":
        denom = np.sqrt(np.maximum(t_self, 0)[:, None] * np.maximum(v_self, 0))
        return np.divide(values, denom, out=np.zeros(np.shape(values)), where=denom > 0)
    raise ValuegateError(f"unknown normalisation {how!r}: use none, length or cosine")


def valid_scale(how: str, v_self: np.ndarray, v_tok: np.ndarray) -> np.ndarray:
    """``(n_v,)`` the factor of each validation sample in its normalised values (``1``, ``1/n'``,
    ``1/‖Φ'‖``; 0 for a zero row under cosine): what the candidate search weighs the sketches by."""
    if how == "none":
        return np.ones(len(v_tok))
    if how == "length":
        return 1.0 / np.maximum(np.asarray(v_tok), 1)
    if how == "cosine":
        vn = np.sqrt(np.maximum(v_self, 0))
        return np.divide(1.0, vn, out=np.zeros_like(vn, dtype=np.float64), where=vn > 0)
    raise ValuegateError(f"unknown normalisation {how!r}: use none, length or cosine")


def aggregate(values: np.ndarray, how: str, k: int = 5) -> tuple[np.ndarray, np.ndarray | None]:
    """Aggregate a ``(n_train, n_valid)`` matrix over the validation set.

    Returns:
        ``(n_train,)`` values and, for ``nearest``, ``(n_train, min(k, n_valid))`` validation indices of
        the top alignments in decreasing order (else None).
    """
    if values.shape[1] == 0:
        raise ValuegateError("the validation set is empty")
    if how == "mean":
        return values.mean(axis=1), None
    if how == "nearest":
        top = top_k(values, k)
        return np.take_along_axis(values, top, axis=1).mean(axis=1), top
    raise ValuegateError(f"unknown aggregate {how!r}: use mean, nearest or pairwise")


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """``(n, min(k, m))`` int64 column indices of each row's k largest values in decreasing order, ties
    by lower index: exactly ``np.argsort(-values, axis=1, kind="stable")[:, :k]``, through ``torch.topk``
    then a sort of the k (the full sort was half of a 100k-row exhaustive ``nearest``, issue 19).

    Args:
        values: ``(n, m)`` float. k: at least 1.
    """
    n, m = values.shape
    k = min(k, m)
    if k == m or n == 0:
        return np.argsort(-values, axis=1, kind="stable")[:, :k].astype(np.int64)
    vals_t, idx_t = torch.topk(torch.from_numpy(np.ascontiguousarray(values)), k, dim=1)  # 5-20x numpy's
    vals, idx = vals_t.numpy(), idx_t.numpy()
    top = np.take_along_axis(idx, np.lexsort((idx, -vals), axis=1), axis=1).astype(np.int64)
    # a tie at the k-th value may have left out a lower index of that value: those rows sort in full
    ties = np.flatnonzero((values >= vals.min(axis=1, keepdims=True)).sum(axis=1) > k)
    if ties.size:
        top[ties] = np.argsort(-values[ties], axis=1, kind="stable")[:, :k]
    return top


def mean_aggregate(train, valid, train_self: np.ndarray, valid_self: np.ndarray, train_tokens: np.ndarray,
                   valid_tokens: np.ndarray, how: str) -> np.ndarray:
    """The ``mean`` aggregate under each normalisation, through one weighted validation vector.

    ``none``: ``mean_j v``; ``length``: ``mean_j v / (n n'_j)``; ``cosine``: ``mean_j v / (‖Φ‖ ‖Φ'_j‖)``
    (exactly :func:`normalize` then the mean, without forming the pairwise matrix).

    Args:
        train, valid: ``(n, V·k_h)`` CSR matrices of sparse rows. Others: ``(n,)`` per-sample columns.

    Returns:
        ``(n_train,)`` float64.
    """
    raw = sparse_mean_csr(train, valid, valid_scale(how, valid_self, valid_tokens) / valid.shape[0])
    return mean_finish(raw, train_self, train_tokens, how)


def mean_vector(valid, valid_self: np.ndarray, valid_tokens: np.ndarray, how: str) -> np.ndarray:
    """``Σ_j w_j Φ(z'_j)`` ``(V·width,)``, the weighted validation vector of the ``mean`` aggregate under
    ``how`` (``w_j`` = :func:`valid_scale` / n_v): one inner product with it and :func:`mean_finish`
    give :func:`mean_aggregate` (within float32 rounding). Summed in float64, returned in float32: the
    streaming scan gathers its blocks for every training block, and the stored rows it meets are int8
    steps; every stored path multiplies with this one vector in float64. valid: ``(n_v, V·width)`` CSR."""
    w = valid_scale(how, valid_self, valid_tokens) / valid.shape[0]
    return np.asarray(valid.astype(np.float64).T @ w).reshape(-1).astype(np.float32)


def mean_finish(raw: np.ndarray, train_self: np.ndarray, train_tokens: np.ndarray, how: str) -> np.ndarray:
    """The ``mean`` aggregate ``(n,)`` from ``raw`` = each training row's inner product with
    :func:`mean_vector` (divided by the training side's own factor under length/cosine)."""
    if how == "none":
        return raw
    if how == "length":
        return raw / np.maximum(train_tokens, 1)
    if how == "cosine":
        tn = np.sqrt(np.maximum(train_self, 0))
        return np.divide(raw, tn, out=np.zeros_like(tn, dtype=np.float64), where=tn > 0)
    raise ValuegateError(f"unknown normalisation {how!r}: use none, length or cosine")


def block_inner_products(tok: np.ndarray, rows: np.ndarray, lengths: np.ndarray, vector: np.ndarray,
                         scales: np.ndarray | None = None, blocks_per_step: int = 1024) -> np.ndarray:
    """``Σ_{u ∈ U_i} R_i[u] · vector[u]`` ``(n,)`` float64 for n rows given as blocks (what a CSR product
    with ``vector`` gives, without building the CSR): the ``mean`` aggregate of a streamed batch.

    The blocks are taken ``blocks_per_step`` at a time into a reused float32 buffer (with ``scales``,
    the stored int8 steps times their scale: the very float32 rows the store's readers return, so no
    float32 copy of the batch is made) and the vector's blocks gathered into a reused one of the
    vector's dtype (``np.take``, not fancy indexing; :func:`mean_vector` is float32); the buffers stay in
    cache. Products and sums are float64, so the result equals the CSR product of the float32 rows with
    the vector up to summation order (issue 19's mean scan: about 3x faster per batch than dequantizing
    the batch, then upcasting it and the vector to float64).

    Args:
        tok: ``(nb,)`` every row's support tokens, concatenated. rows: ``(nb·width,)`` or ``(nb, width)``
            their blocks (int8 steps with ``scales``, else float). lengths: ``(n,)`` blocks per row.
            vector: ``(V·width,)``. scales: ``(nb,)`` float32 the step of each block, or None.
    """
    n = len(lengths)
    if not len(tok):
        return np.zeros(n)
    r = np.asarray(rows).reshape(len(tok), -1)
    width = r.shape[1]
    dense = np.asarray(vector).reshape(-1, width)
    tok = np.asarray(tok, dtype=np.int64)
    s = None if scales is None else np.asarray(scales, dtype=np.float32)
    dots = np.empty(len(tok))
    step = min(blocks_per_step, len(tok))
    x = np.empty((step, width), np.result_type(r.dtype, np.float32))
    y = np.empty((step, width), dense.dtype)
    for lo in range(0, len(tok), step):
        m = min(step, len(tok) - lo)
        np.copyto(x[:m], r[lo:lo + m], casting="unsafe")
        if s is not None:
            x[:m] *= s[lo:lo + m, None]
        np.take(dense, tok[lo:lo + m], axis=0, out=y[:m])
        dots[lo:lo + m] = np.einsum("ij,ij->i", x[:m], y[:m], dtype=np.float64)
    owner = np.repeat(np.arange(n), lengths)
    return np.bincount(owner, weights=dots, minlength=n)


# --------------------------------------------------------------------------------------------------
# Scoring a stored run chunk by chunk: the validation side built once, each chunk of training rows valued
# against it (tasks/score.py reads the feature rows and writes the scores).
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoringContext:
    """The validation side of a scores run, read once (per process) and reused for every chunk.

    Attributes:
        vids: ``(n_v,)`` object array of validation ids. v_self, v_tok: ``(n_v,)`` ``‖Φ'‖²`` and counted
            positions. vside: the sparse right-hand side of every product (signals on); vm: plain CSR
            ``(n_v, V·width)`` (signals off). v_hidden: ``(n_v, d)`` mean hidden states (the rds baselines).
        faults: the fault detectors' reference pool (signals on; :mod:`valuegate.engine.faults`), and
            fault_pool: training id → its position in that pool (a row is never its own neighbour).
        v_mean: ``(V·width,)`` the weighted validation vector of the ``mean`` aggregate (signals off,
            :func:`mean_vector`). cand: the candidate search and rescoring side of the ``nearest`` aggregate
            (signals off, ``score.nearest_candidates`` > 0); sketch_seed: the seed of its count sketches.
            groups: the validation blocks by token, for the exact value matrix (signals off, an aggregate
            other than ``mean`` and no candidate search: :func:`~valuegate.engine.token_products.grouped_values`).
    """

    vids: np.ndarray
    v_self: np.ndarray
    v_tok: np.ndarray
    vside: ValidSide | None = None
    vm: object = None
    v_hidden: np.ndarray | None = None
    faults: FaultReference | None = None
    fault_pool: dict[str, int] = field(default_factory=dict)
    v_mean: np.ndarray | None = None
    cand: CandidateSide | None = None
    sketch_seed: int = 0
    groups: TokenGroups | None = None


def sketch_dim(settings: Settings) -> int:
    """Floats of the count sketches the candidate search compares: ``extract.sketch_dim``, or 256 when
    no sketch is stored (``sketch_dim`` 0: both sides are sketched while scoring)."""
    return int(getattr(settings.extract, "sketch_dim", 0) or 256)


def build_context(vids: list[str], v_self: np.ndarray | None, v_tok: np.ndarray, hidden: np.ndarray, settings: Settings,
                  hidden_size: int, vocab: int, vm: object = None, valid: SparseSet | None = None,
                  valid_hard: SparseSet | None = None, width: int = 1,
                  v_sketch: np.ndarray | None = None) -> ScoringContext:
    """The validation side every chunk is scored against.

    Args:
        vids: the validation ids in scoring order (n_v). v_self, v_tok: ``(n_v,)`` ``‖Φ'‖²`` and counted
            positions (v_self None, signals on: the row norms of ``valid``, as the in-memory path). hidden: ``(n_v, d)`` mean hidden states. hidden_size, vocab: the feature set's ``d``
            and ``V``.
        vm: ``(n_v, V·width)`` CSR of the sparse rows (signals off). valid, valid_hard: the rows as
            :class:`SparseSet` (signals on; ``valid_hard`` when ``extract.hard_fraction < 1``).
        width: floats per support entry of ``vm`` (its blocks, for the candidates' rescoring).
        v_sketch: ``(n_v, D)`` stored count sketches of the rows (None: sketched here when needed).
    """
    ex, sc = settings.extract, settings.score
    ctx = ScoringContext(np.asarray(vids, dtype=object), v_self, v_tok, vm=vm, sketch_seed=int(ex.seed))
    if not sc.signals and sc.aggregate == "mean":
        ctx.v_mean = mean_vector(vm, v_self, v_tok, sc.normalize)
    if not sc.signals and sc.aggregate == "nearest" and sc.nearest_candidates > 0:
        sk = None
        if sc.nearest_candidates < len(vids):  # else every validation sample is a candidate
            sk = v_sketch if v_sketch is not None else count_sketch(vm, sketch_dim(settings), seed=ctx.sketch_seed)
        ctx.cand = CandidateSide.build(vm, width, sk, valid_scale(sc.normalize, v_self, v_tok))
    elif not sc.signals and sc.aggregate != "mean" and vm is not None:
        ctx.groups = TokenGroups.build(BlockRows.from_csr(vm, width), vocab)
    ctx.v_hidden = np.asarray(hidden, dtype=np.float64)  # the rds baselines, and the local suspect reference
    if sc.signals:
        ctx.vside = ValidSide.build(valid, projected_centre(ex, hidden_size, vocab, ctx.v_hidden, ctx.v_tok))
        if ctx.v_self is None:
            ctx.v_self = ctx.vside.self_raw
    return ctx


@dataclass
class ChunkScores:
    """What :func:`score_chunk` computes for n training samples.

    Attributes:
        value: ``(n,)`` the aggregate of ``score.aggregate``. nearest: ``(n, k)`` indices into the context's
            validation ids of the top alignments (None on the ``mean`` path without signals);
            nearest_values: ``(n, k)`` their normalised values. suspect: ``(n,)`` (signals on, else None);
            suspect_reason: per sample, the deviations behind it. signals: name → ``(n,)`` every signal.
            self_influence: ``(n,)`` the ``‖Φ‖²`` the normalisation used (the caller's, or the rows' own).
    """

    value: np.ndarray
    nearest: np.ndarray | None = None
    nearest_values: np.ndarray | None = None
    suspect: np.ndarray | None = None
    suspect_reason: list[str] | None = None
    signals: dict[str, np.ndarray] = field(default_factory=dict)
    self_influence: np.ndarray | None = None


def nearest_of_candidates(ctx: ScoringContext, sc, t_self: np.ndarray, t_tok: np.ndarray, train_csr,
                          t_sketch: np.ndarray | None = None,
                          train_blocks: BlockRows | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``nearest`` aggregate by candidates (signals off): per training row the
    ``sc.nearest_candidates`` validation rows of largest sketch inner product (scaled by the
    normalisation's validation factor), their exact values, the top ``sc.nearest_k`` of those.

    Args:
        train_csr: ``(n, V·width)`` CSR rows (may be None when ``train_blocks`` and ``t_sketch`` are given).
        t_sketch: ``(n, D)`` their stored sketches (None: sketched here from ``train_csr`` with the
        context's seed). train_blocks: the rows as blocks (None: taken from ``train_csr``).

    Returns:
        ``(value (n,), nearest (n, k) validation indices, nearest_values (n, k))``, as :func:`aggregate`
        of the normalised exhaustive matrix when the candidates hold the exact top k (ties: lower index).
    """
    side = ctx.cand
    n_v = side.n_valid
    if n_v == 0:
        raise ValuegateError("the validation set is empty")
    blocks = train_blocks if train_blocks is not None else BlockRows.from_csr(train_csr, side.blocks.width)
    n = blocks.ptr.size - 1
    c = min(sc.nearest_candidates, n_v)
    if side.sketch is None or c >= n_v:
        cand = np.broadcast_to(np.arange(n_v), (n, n_v)).copy()
    else:
        if t_sketch is None:
            t_sketch = count_sketch(train_csr, side.sketch.shape[1], seed=ctx.sketch_seed)
        cand = top_candidates(t_sketch, side.sketch, c)
    raw = candidate_values(blocks, side, cand)
    values = normalized(raw, sc.normalize, t_self, t_tok, ctx.v_self[cand], ctx.v_tok[cand])
    k = min(sc.nearest_k, c)
    top = np.argsort(-values, axis=1, kind="stable")[:, :k]  # candidates ascending: ties keep the lower index
    near_values = np.take_along_axis(values, top, axis=1)
    return near_values.mean(axis=1), np.take_along_axis(cand, top, axis=1), near_values


def score_chunk(ctx: ScoringContext, sc, t_self: np.ndarray | None, t_tok: np.ndarray, t_loss: np.ndarray,
                t_hidden: np.ndarray, train_csr: object = None, train: SparseSet | None = None,
                train_hard: SparseSet | None = None, t_sketch: np.ndarray | None = None,
                t_mean_raw: np.ndarray | None = None, train_blocks: BlockRows | None = None) -> ChunkScores:
    """Value n training samples against the context with ``score`` settings ``sc``.

    Args:
        t_self, t_tok, t_loss: ``(n,)`` ``‖Φ‖²`` (None, signals on: the row norms of ``train``, as the
            in-memory path), counted positions, mean loss. t_hidden: ``(n, d)`` mean
            hidden states. train_csr: ``(n, V·width)`` CSR of the sparse rows (signals off). train,
            train_hard: the rows as :class:`SparseSet` (signals on). t_sketch: ``(n, D)`` stored sketches
            (signals off, nearest by candidates); train_blocks: the rows as blocks (the same, and the
            exact value matrix by token groups; then ``train_csr`` is needed only to sketch rows without a
            stored sketch). t_mean_raw: ``(n,)`` each row's inner product with
            ``ctx.v_mean``, computed by the caller (a streaming scan; signals off, mean): then
            ``train_csr`` is not needed.
    """
    k = sc.nearest_k
    out = ChunkScores(np.empty(0))
    if sc.signals:
        terms, out.signals = sparse_signal_terms(train, train_hard, ctx.vside, k)
        raw = terms.raw
        if t_self is None:
            t_self = terms.self_raw
    elif sc.aggregate == "mean":
        if t_mean_raw is None:
            t_mean_raw = (np.asarray(train_csr.astype(np.float64) @ ctx.v_mean.astype(np.float64)).reshape(-1)
                          if ctx.v_mean is not None
                          else sparse_mean_csr(train_csr, ctx.vm, valid_scale(sc.normalize, ctx.v_self, ctx.v_tok)
                                               / ctx.vm.shape[0]))
        out.value = mean_finish(t_mean_raw, t_self, t_tok, sc.normalize)
        raw = None
    elif sc.aggregate == "nearest" and ctx.cand is not None:
        out.value, out.nearest, out.nearest_values = nearest_of_candidates(ctx, sc, t_self, t_tok, train_csr, t_sketch,
                                                                           train_blocks)
        raw = None
    elif ctx.groups is not None:
        blocks = train_blocks if train_blocks is not None else BlockRows.from_csr(train_csr, ctx.groups.width)
        raw = grouped_values(blocks, ctx.groups)
    else:
        raw = sparse_cross_csr(train_csr, ctx.vm)
    if raw is not None:
        scored = aggregates_of(normalized(raw, sc.normalize, t_self, t_tok, ctx.v_self, ctx.v_tok), sc)
        scored.signals = out.signals
        out = scored
    out.self_influence = t_self
    return out


def aggregates_of(values: np.ndarray, sc) -> ChunkScores:
    """:class:`ChunkScores` of a normalised value matrix ``(n, n_v)``: the ``sc.aggregate`` value ``(n,)``,
    the ``sc.nearest_k`` nearest validation indices ``(n, k)`` and their values (what :func:`score_chunk`
    does with a chunk's matrix, and the oracle with the whole one)."""
    out = ChunkScores(np.empty(0))
    out.value, out.nearest = aggregate(values, "nearest", sc.nearest_k)
    if sc.aggregate != "nearest":
        out.value = aggregate(values, sc.aggregate, sc.nearest_k)[0]
    out.nearest_values = np.take_along_axis(values, out.nearest, 1)
    return out
