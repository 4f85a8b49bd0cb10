"""The math of For-Value (docs/ARCHITECTURE.md §4): token features, exact kernels, sparse rows, aggregates.

Notation. For one sample, the counted positions t carry the final hidden state ``h_t ∈ R^d`` (the input
of the LM head ``W ∈ R^{V×d}``), the next-token probabilities ``p_t`` and the observed next token
``y_t``. The sample representation is the gradient of the summed log-likelihood w.r.t. the head's use::

    Φ(z) = Σ_t a_t h_tᵀ ∈ R^{V×d},   a_t = s_t ⊙ (onehot(y_t) − p_t)

where ``s_t = ∂ logits_t / ∂ (W h_t)`` is the elementwise Jacobian of the model's logit transform
(1 for a plain linear head; ``1/c`` for a head divided by ``c``; ``1 − tanh²(z/cap)`` under Gemma-2 style
soft-capping), so that Φ is the exact LM-head gradient for every supported family. The value of a train
sample z for a validation sample z' is ``v(z, z') = ⟨Φ(z), Φ(z')⟩_F = Σ_t Σ_s (h_t·h'_s)(a_t·a'_s)`` with,
writing ``q_t = s_t ⊙ p_t`` and ``g_t = s_t[y_t]``::

    a_t·a'_s = [y_t = y'_s] g_t g'_s − g_t q'_s[y_t] − g'_s q_t[y'_s] + q_t·q'_s

Nothing here imports Prefect, LanceDB or the model code: the inputs are tensors of counted positions
(:class:`TokenBlock`), produced by ``tasks/extract.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "SparseFeatures",
    "TokenBlock",
    "error_rows_on_support",
    "exact_cross",
    "exact_self",
    "gaussian_projection",
    "hardest_positions",
    "logit_jacobian",
    "sparse_cross",
    "sparse_features",
    "sparse_matrix",
    "sparse_self",
]


@dataclass
class TokenBlock:
    """The counted positions of a few whole samples, concatenated sample after sample.

    Attributes:
        hidden: ``(N, d)`` float32, final normed hidden states ``h_t`` (the LM head's input).
        probs: ``(N, V)`` float32, next-token probabilities ``p_t`` (softmax of the final logits).
        targets: ``(N,)`` int64, observed next tokens ``y_t``.
        sample: ``(N,)`` int64, index of each position's sample within the block, non-decreasing.
        n_samples: number of samples in the block (a sample may have no row only if it counts no token,
            which extraction refuses before a block is built).
        logit_jac: ``(N, V)`` float32 or None, the Jacobian ``s_t`` of the logit transform; None means 1.
        log_likelihood: ``(N,)`` float32, ``log p_t[y_t]`` in nats.
        sample_stats: per-sample statistics of the forward pass beyond the counted positions, name →
            ``(n_samples,)`` float32 (``end_log_prob``, ``prompt_overlap``: :mod:`valuegate.engine.ending`), or
            None. Carried unchanged by :meth:`subset`, :meth:`centred` and :meth:`hardest`.
    """

    hidden: torch.Tensor
    probs: torch.Tensor
    targets: torch.Tensor
    sample: torch.Tensor
    n_samples: int
    logit_jac: torch.Tensor | None = None
    log_likelihood: torch.Tensor | None = None
    sample_stats: dict[str, torch.Tensor] | None = None
    _bounds: list[tuple[int, int]] | None = field(default=None, repr=False)

    def bounds(self) -> list[tuple[int, int]]:
        """Row range ``[start, stop)`` of every sample, in sample order."""
        if self._bounds is None:
            counts = torch.bincount(self.sample, minlength=self.n_samples).tolist()
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
            self._bounds = [(s, s + c) for s, c in zip(starts, counts, strict=True)]
        return self._bounds

    def weighted_probs(self) -> torch.Tensor:
        """``q_t = s_t ⊙ p_t``, ``(N, V)`` float32."""
        return self.probs if self.logit_jac is None else self.probs * self.logit_jac

    def target_jac(self) -> torch.Tensor:
        """``g_t = s_t[y_t]``, ``(N,)`` float32."""
        if self.logit_jac is None:
            return torch.ones(self.targets.shape[0], dtype=torch.float32, device=self.targets.device)
        return self.logit_jac.gather(1, self.targets[:, None])[:, 0]

    def subset(self, keep: torch.Tensor) -> TokenBlock:
        """The positions where ``keep`` (``(N,)`` bool) holds; samples keep their indices."""
        return TokenBlock(hidden=self.hidden[keep], probs=self.probs[keep], targets=self.targets[keep],
                          sample=self.sample[keep], n_samples=self.n_samples,
                          logit_jac=None if self.logit_jac is None else self.logit_jac[keep],
                          log_likelihood=None if self.log_likelihood is None else self.log_likelihood[keep],
                          sample_stats=self.sample_stats)

    def centred(self, mu: torch.Tensor) -> TokenBlock:
        """The block with every hidden state replaced by ``h_t − μ`` (``μ``: ``(d,)``)."""
        return TokenBlock(hidden=self.hidden - mu.to(self.hidden), probs=self.probs, targets=self.targets,
                          sample=self.sample, n_samples=self.n_samples, logit_jac=self.logit_jac,
                          log_likelihood=self.log_likelihood, sample_stats=self.sample_stats,
                          _bounds=self._bounds)

    def hardest(self, ratio: float) -> TokenBlock:
        """The block restricted to each sample's hardest ``ratio`` of positions (:func:`hardest_positions`)."""
        if ratio >= 1.0:
            return self
        if self.log_likelihood is None:
            raise ValueError("the hardest positions need the log-likelihoods")
        return self.subset(hardest_positions(self.log_likelihood, self.sample, self.n_samples, ratio))

    @staticmethod
    def concat(blocks: list[TokenBlock]) -> TokenBlock:
        """Stack blocks into one (sample indices are offset), e.g. a whole validation set."""
        if not blocks:
            raise ValueError("no block to concatenate")
        offsets = np.cumsum([0] + [b.n_samples for b in blocks[:-1]]).tolist()
        has_jac = blocks[0].logit_jac is not None
        has_ll = all(b.log_likelihood is not None for b in blocks)
        stats = None
        if all(b.sample_stats is not None for b in blocks):
            names = set.intersection(*(set(b.sample_stats) for b in blocks))
            stats = {k: torch.cat([b.sample_stats[k] for b in blocks]) for k in sorted(names)}
        return TokenBlock(
            hidden=torch.cat([b.hidden for b in blocks]),
            probs=torch.cat([b.probs for b in blocks]),
            targets=torch.cat([b.targets for b in blocks]),
            sample=torch.cat([b.sample + o for b, o in zip(blocks, offsets, strict=True)]),
            n_samples=sum(b.n_samples for b in blocks),
            logit_jac=torch.cat([b.logit_jac for b in blocks]) if has_jac else None,
            log_likelihood=torch.cat([b.log_likelihood for b in blocks]) if has_ll else None,
            sample_stats=stats,
        )


def logit_jacobian(raw_logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor | None:
    """Jacobian ``s = ∂ final_logits / ∂ raw_logits`` (elementwise) of the head's logit transform.

    ``final = softcap · tanh(scale · raw / softcap)`` when ``softcap`` is set, else ``scale · raw``.

    Args:
        raw_logits: ``(N, V)`` float32, ``W h_t (+ b)``.
        scale: multiplier applied to the raw logits (1 for most models).
        softcap: Gemma-2 style final soft-capping constant, or None.

    Returns:
        ``(N, V)`` float32, or None when the transform is the identity.
    """
    if softcap is None:
        if scale == 1.0:
            return None
        return torch.full_like(raw_logits, float(scale))
    t = torch.tanh(raw_logits * (scale / softcap))
    return (1.0 - t * t) * scale


def hardest_positions(log_likelihood: torch.Tensor, sample: torch.Tensor, n_samples: int,
                      ratio: float) -> torch.Tensor:
    """Keep, in every sample, only the ``ceil(ratio · n)`` counted positions of lowest likelihood.

    This is For-Value's ``lowest_likelihood_ratio``: the value then rests on the tokens the model finds
    hardest. Ties are broken by position, so the choice never depends on the batch.

    Args:
        log_likelihood: ``(N,)`` ``log p_t[y_t]``.
        sample: ``(N,)`` non-decreasing sample index of each position.
        n_samples: number of samples.
        ratio: fraction in (0, 1]; 1 keeps everything.

    Returns:
        ``(N,)`` bool mask of the kept positions (at least one per sample that has any).
    """
    if ratio >= 1.0:
        return torch.ones_like(sample, dtype=torch.bool)
    keep = torch.zeros_like(sample, dtype=torch.bool)
    counts = torch.bincount(sample, minlength=n_samples).tolist()
    start = 0
    for c in counts:
        if c:
            k = max(1, int(np.ceil(ratio * c - 1e-9)))
            ll = log_likelihood[start:start + c].double()
            # stable: sort by (likelihood, position)
            order = np.lexsort((np.arange(c), ll.cpu().numpy()))
            keep[start + torch.as_tensor(order[:k], device=keep.device)] = True
        start += c
    return keep


def _segment_sum_2d(m: torch.Tensor, rows: torch.Tensor, n_rows: int, cols: torch.Tensor,
                    n_cols: int) -> torch.Tensor:
    """Sum a ``(Na, Nb)`` token matrix into a ``(n_rows, n_cols)`` float64 sample matrix."""
    m = m.double()
    by_row = torch.zeros(n_rows, m.shape[1], dtype=torch.float64, device=m.device).index_add_(0, rows, m)
    return torch.zeros(n_rows, n_cols, dtype=torch.float64, device=m.device).index_add_(1, cols, by_row)


def _error_kernel(qa: torch.Tensor, ya: torch.Tensor, ga: torch.Tensor,
                  qb: torch.Tensor, yb: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
    """``(Na, Nb)`` float32 matrix of ``a_t·a'_s`` over the full vocabulary (see the module docstring)."""
    ke = qa @ qb.T
    ke -= ga[:, None] * qb[:, ya].T
    ke -= gb[None, :] * qa[:, yb]
    ke += (ya[:, None] == yb[None, :]) * (ga[:, None] * gb[None, :])
    return ke


def exact_cross(a: TokenBlock, b: TokenBlock, row_chunk: int = 1024) -> torch.Tensor:
    """Exact For-Value between every sample of ``a`` and every sample of ``b``, never forming ``V×d``.

    Cost ``O(Na · Nb · (d + V))`` for ``Na``/``Nb`` counted positions; ``a`` is processed in chunks of
    ``row_chunk`` positions so the temporaries stay ``(row_chunk, Nb)``.

    Returns:
        ``(a.n_samples, b.n_samples)`` float64 matrix of ``⟨Φ(z_a), Φ(z_b)⟩_F``.
    """
    qb, gb = b.weighted_probs(), b.target_jac()
    qa_all, ga_all = a.weighted_probs(), a.target_jac()
    out = torch.zeros(a.n_samples, b.n_samples, dtype=torch.float64, device=a.hidden.device)
    bounds = a.bounds()
    # chunk on sample boundaries so each chunk's segment sum touches only its own samples
    i = 0
    while i < len(bounds):
        j = i
        while j + 1 < len(bounds) and bounds[j + 1][1] - bounds[i][0] <= row_chunk:
            j += 1
        lo, hi = bounds[i][0], bounds[j][1]
        kh = a.hidden[lo:hi] @ b.hidden.T
        ke = _error_kernel(qa_all[lo:hi], a.targets[lo:hi], ga_all[lo:hi], qb, b.targets, gb)
        rows = a.sample[lo:hi] - i
        out[i:j + 1] = _segment_sum_2d(kh * ke, rows, j + 1 - i, b.sample, b.n_samples)
        i = j + 1
    return out


def exact_self(block: TokenBlock) -> torch.Tensor:
    """Exact self-influence ``‖Φ(z)‖²_F`` of every sample of the block.

    Returns:
        ``(n_samples,)`` float64.
    """
    q, g = block.weighted_probs(), block.target_jac()
    out = torch.zeros(block.n_samples, dtype=torch.float64)
    for i, (lo, hi) in enumerate(block.bounds()):
        if hi == lo:
            continue
        h, y = block.hidden[lo:hi], block.targets[lo:hi]
        kh = h @ h.T
        ke = _error_kernel(q[lo:hi], y, g[lo:hi], q[lo:hi], y, g[lo:hi])
        out[i] = (kh.double() * ke.double()).sum()
    return out


def gaussian_projection(seed: int, in_dim: int, out_dim: int) -> torch.Tensor:
    """Seeded Gaussian projection ``P ∈ R^{out_dim × in_dim}`` scaled by ``1/sqrt(out_dim)``.

    Regenerated bit-identically from ``(seed, in_dim, out_dim)`` (NumPy's PCG64 stream), so stored
    features stay comparable across processes, machines and runs.

    Returns:
        ``(out_dim, in_dim)`` float32 CPU tensor.
    """
    rng = np.random.default_rng([int(seed), int(in_dim), int(out_dim)])
    m = rng.standard_normal((out_dim, in_dim), dtype=np.float32) / np.float32(np.sqrt(out_dim))
    return torch.from_numpy(m)


@dataclass
class SparseFeatures:
    """The stored features of one sample (docs/ARCHITECTURE.md §4 "sparse", plus the dense search vectors).

    Attributes:
        token_ids: ``(|U|,)`` int32, the sorted support ``U = ∪_t ({y_t} ∪ top-k(p_t))``.
        rows: ``(|U|, k_h)`` float32, ``R = A[:, U]ᵀ (H P_hᵀ)`` (``k_h = d`` when unprojected); in the
            stored form (:func:`valuegate.engine.extraction.stored_features`) rounded to int8 steps.
        n_tokens: counted positions behind the rows.
        mean_loss: mean ``−log p_t[y_t]`` over those positions, nats.
        dropped_mass: mean over positions of the probability mass outside the support (the error bound
            of the sparse path: 0 means the rows are exact in the vocabulary).
        self_influence: ``Σ_u ‖R[u]‖²``, the sparse estimate of ``‖Φ(z)‖²_F``, in float64 (of the rows as
            they are: in the stored form, of the rounded rows).
        mean_hidden: ``(d,)`` float32, the mean final hidden state ``Σ_t h_t / n_tokens`` over the counted
            positions (the RDS baselines, the local suspect reference, the signals' centre, vector search);
            in the stored form rounded to float16.
        pooled_error: ``(k_e,)`` float32, ``Σ_t P_e a_t`` on the support (for vector search only).
        error_sum: ``(|U|,)`` float32, ``Σ_t a_t[U]``, aligned with ``token_ids``: with it the rows of the
            sample with hidden states centred on any vector ``μ`` are ``R − error_sum ⊗ P_h μ``, so the
            centred-hidden signals need no second pass.
        hard: the same features on the sample's hardest positions only (see :func:`hardest_positions`),
            or None when not extracted.
        sketch: ``(sketch_dim,)`` count sketch of ``rows`` (stored form only), or None.
        rows_scale: ``(|U|,)`` float32 the int8 scale of each row block (stored form only: ``rows`` are then
            exactly ``q · rows_scale``, :mod:`valuegate.engine.quantize`), or None.
        max_loss: the largest ``−log p_t[y_t]`` over the positions, nats (the surprisal spike).
        end_loss: ``−log p(end of answer)`` after the response (:mod:`valuegate.engine.ending`), NaN when the
            sample has no end (truncated) or the block carries none.
        prompt_overlap: the longest run of the response's tokens found verbatim in the prompt, as a share of
            the response's tokens (:func:`valuegate.engine.ending.prompt_overlap`); NaN when not computed.
    """

    token_ids: np.ndarray
    rows: np.ndarray
    n_tokens: int
    mean_loss: float
    dropped_mass: float
    self_influence: float
    mean_hidden: np.ndarray
    pooled_error: np.ndarray
    error_sum: np.ndarray
    hard: SparseFeatures | None = None
    sketch: np.ndarray | None = None
    rows_scale: np.ndarray | None = None
    max_loss: float = float("nan")
    end_loss: float = float("nan")
    prompt_overlap: float = float("nan")

    @property
    def nbytes(self) -> int:
        """Bytes of the sparse rows as stored (ids + rows)."""
        return int(self.token_ids.nbytes + self.rows.nbytes)


def error_rows_on_support(probs: torch.Tensor, targets: torch.Tensor, support: torch.Tensor,
                          logit_jac: torch.Tensor | None) -> torch.Tensor:
    """The errors ``a_t`` restricted to the support columns.

    Args:
        probs: ``(T, V)`` float32. targets: ``(T,)`` int64. support: ``(U,)`` sorted int64 containing every
        target. logit_jac: ``(T, V)`` or None.

    Returns:
        ``(T, U)`` float32, ``s_t[u] (δ_{u,y_t} − p_t[u])``.
    """
    err = -probs[:, support]
    pos = torch.searchsorted(support, targets)
    err[torch.arange(targets.shape[0], device=err.device), pos] += 1.0
    if logit_jac is not None:
        err *= logit_jac[:, support]
    return err


def sparse_features(block: TokenBlock, support_k: int, hidden_proj: torch.Tensor | None,
                    error_proj: torch.Tensor | None) -> list[SparseFeatures]:
    """Sparse rows and dense vectors of every sample of a block.

    The support depends on the sample alone (its targets and its own top-k predictions), so the features
    never depend on the batch the sample was extracted in.

    Args:
        block: counted positions of whole samples.
        support_k: predictions kept per position (``top-k(p_t)``); ``>= V`` keeps the whole vocabulary.
        hidden_proj: ``(k_h, d)`` projection ``P_h`` or None to keep ``h`` exact.
        error_proj: ``(k_e, V)`` projection ``P_e`` for the pooled error vector, or None (empty vector).

    Returns:
        one :class:`SparseFeatures` per sample, in sample order.
    """
    vocab = block.probs.shape[1]
    k = min(int(support_k), vocab)
    top = torch.topk(block.probs, k, dim=1, sorted=False).indices if k < vocab else None
    hp = block.hidden if hidden_proj is None else block.hidden @ hidden_proj.T
    ll = block.log_likelihood
    stats = {k: v.double().cpu().numpy() for k, v in (block.sample_stats or {}).items()}
    end_lp = stats.get("end_log_prob", np.full(block.n_samples, np.nan))
    overlap = stats.get("prompt_overlap", np.full(block.n_samples, np.nan))
    out: list[SparseFeatures] = []
    for i, (lo, hi) in enumerate(block.bounds()):
        p, y, jac = block.probs[lo:hi], block.targets[lo:hi], None
        if block.logit_jac is not None:
            jac = block.logit_jac[lo:hi]
        if top is None:
            support = torch.arange(vocab, device=p.device)
        else:
            support = torch.unique(torch.cat([y, top[lo:hi].reshape(-1)]))
        err = error_rows_on_support(p, y, support, jac)
        rows = err.T @ hp[lo:hi]
        kept_mass = p[:, support].sum(1)
        if error_proj is not None:
            pooled_error = (error_proj[:, support] @ err.sum(0)).cpu().numpy()
        else:
            pooled_error = np.zeros(0, dtype=np.float32)
        loss = float(-ll[lo:hi].double().mean()) if ll is not None else float("nan")
        out.append(SparseFeatures(
            token_ids=support.to(torch.int32).cpu().numpy(),
            rows=rows.cpu().numpy().astype(np.float32, copy=False),
            n_tokens=hi - lo,
            mean_loss=loss,
            dropped_mass=float((1.0 - kept_mass).clamp_min(0).double().mean()),
            self_influence=float(rows.double().pow(2).sum()),
            mean_hidden=block.hidden[lo:hi].double().mean(0).float().cpu().numpy(),
            pooled_error=pooled_error,
            error_sum=err.sum(0).cpu().numpy().astype(np.float32, copy=False),
            max_loss=float(-ll[lo:hi].double().min()) if ll is not None and hi > lo else float("nan"),
            end_loss=float(-end_lp[i]),
            prompt_overlap=float(overlap[i]),
        ))
    return out


def sparse_matrix(feats: list[SparseFeatures], vocab: int) -> sp.csr_matrix:
    """``(n, V·k_h)`` CSR matrix whose row i is sample i's rows flattened by token id."""
    width = feats[0].rows.shape[1] if feats else 0
    indptr = np.zeros(len(feats) + 1, dtype=np.int64)
    indices, data = [], []
    for i, f in enumerate(feats):
        if f.rows.shape[1] != width:
            raise ValueError("features of different widths cannot be compared (different k_h)")
        cols = (f.token_ids.astype(np.int64)[:, None] * width + np.arange(width)[None, :]).reshape(-1)
        indices.append(cols)
        data.append(f.rows.reshape(-1).astype(np.float64))
        indptr[i + 1] = indptr[i] + cols.size
    ind = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    dat = np.concatenate(data) if data else np.zeros(0)
    return sp.csr_matrix((dat, ind, indptr), shape=(len(feats), max(vocab, 1) * max(width, 1)))


def sparse_cross(train: list[SparseFeatures], valid: list[SparseFeatures], vocab: int,
                 train_chunk: int = 256) -> np.ndarray:
    """``v(z, z') ≈ Σ_{u ∈ U ∩ U'} R[u]·R'[u]`` for every train/validation pair.

    Returns:
        ``(len(train), len(valid))`` float64.
    """
    out = np.zeros((len(train), len(valid)), dtype=np.float64)
    if not train or not valid:
        return out
    vt = sparse_matrix(valid, vocab).T.tocsc()
    for lo in range(0, len(train), train_chunk):
        part = sparse_matrix(train[lo:lo + train_chunk], vocab)
        out[lo:lo + part.shape[0]] = (part @ vt).toarray()
    return out


def sparse_self(feats: list[SparseFeatures]) -> np.ndarray:
    """``(n,)`` float64 self-influence estimates ``Σ_u ‖R[u]‖²``."""
    return np.array([f.self_influence for f in feats], dtype=np.float64)


def sparse_mean_csr(train: sp.csr_matrix, valid: sp.csr_matrix, valid_weights: np.ndarray | None = None,
                    train_chunk: int = 65536) -> np.ndarray:
    """``Σ_j w_j v(z, z'_j)`` for every train sample, without the pairwise matrix.

    v is linear in Φ(z'), so the weighted sum over the validation set is one inner product with
    ``Σ_j w_j Φ(z'_j)``: a single sparse vector. Cost ``O(nnz(train))`` instead of ``O(n_train · n_valid)``
    pair products. With ``w_j = 1/n_valid`` this is the ``mean`` aggregate.

    Returns:
        ``(n_train,)`` float64.
    """
    w = np.full(valid.shape[0], 1.0 / valid.shape[0]) if valid_weights is None else valid_weights
    v = np.asarray(valid.astype(np.float64).T @ w).reshape(-1)
    out = np.zeros(train.shape[0], dtype=np.float64)
    for lo in range(0, train.shape[0], train_chunk):
        part = train[lo:lo + train_chunk].astype(np.float64)
        out[lo:lo + part.shape[0]] = part @ v
    return out


def sparse_cross_csr(train: sp.csr_matrix, valid: sp.csr_matrix, train_chunk: int = 4096) -> np.ndarray:
    """:func:`sparse_cross` on prebuilt ``(n, V·k_h)`` CSR matrices (e.g. read straight from the store).

    Returns:
        ``(n_train, n_valid)`` float64.
    """
    out = np.zeros((train.shape[0], valid.shape[0]), dtype=np.float64)
    vt = valid.astype(np.float64).T.tocsc()
    for lo in range(0, train.shape[0], train_chunk):
        part = train[lo:lo + train_chunk].astype(np.float64)
        out[lo:lo + part.shape[0]] = (part @ vt).toarray()
    return out
