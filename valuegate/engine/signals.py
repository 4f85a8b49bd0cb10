"""Per-sample value signals beside the value: every sample gets a set of signals, each on all counted tokens
and on the hardest fraction of them (``hard_`` prefix):

=========================  ===============================================================================
``value_mean``             ``mean_j ⟨Φ, Φ'_j⟩`` (For-Value's value)
``value_nearest``          mean of the ``k`` largest ``⟨Φ, Φ'_j⟩``
``cosine_mean/_nearest``   the same on ``⟨Φ, Φ'_j⟩ / (‖Φ‖ ‖Φ'_j‖)``
``per_token_mean``         ``mean_j ⟨Φ, Φ'_j⟩ / (n n'_j)`` (``n``: counted tokens)
``centred_value_mean``     ``mean_j ⟨Φ_c, Φ'_{c,j}⟩`` where ``Φ_c = Σ_t a_t (h_t − μ)ᵀ`` and ``μ`` is the mean
                           validation hidden state: the part of the alignment that is not shared by every
                           sample of the model
``centred_cosine_*``       cosine of the centred representations (mean, nearest)
``log_self_influence``     ``log ‖Φ‖²``
``mean_loss``              mean token loss, nats
=========================  ===============================================================================

The hard signals value the hardest positions of the sample (For-Value's ``lowest_likelihood_ratio``)
against the validation samples' full representations.

The ``suspect`` score is not made of these signals: it is the fault detectors' (:mod:`valuegate.engine.faults`,
issue 27), which read per-row statistics of the forward pass (loss with and without the prompt, the surprisal
of the hardest tokens, the end of the answer). The value signals stay columns of every scores run: what a row
is worth to the validation target, on each side of the hidden-state centre and on the hardest tokens.

Too small a validation set is refused with one line naming it (:func:`check_reference_size`, called before
any extraction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from valuegate.engine.columns import BASE_SIGNALS
from valuegate.engine.forvalue import SparseFeatures, TokenBlock, exact_cross, exact_self, sparse_cross_csr
from valuegate.errors import ValuegateError

__all__ = [
    "BASE_SIGNALS",
    "MIN_REFERENCE",
    "CrossTerms",
    "SparseSet",
    "check_reference_size",
    "cross_terms_exact",
    "cross_terms_sparse",
    "signal_names",
    "signals_from_terms",
]

# Fewest validation samples a scores run with the signals on accepts (see check_reference_size).
MIN_REFERENCE = 3


def signal_names(hard: bool) -> list[str]:
    """Every signal column, the ``hard_`` ones only when ``hard``."""
    return list(BASE_SIGNALS) + ([f"hard_{s}" for s in BASE_SIGNALS] if hard else [])


@dataclass
class CrossTerms:
    """What the signals of ``n`` samples need against ``n_v`` validation samples (one token selection).

    Attributes:
        raw: ``(n, n_v)`` float64 ``⟨Φ, Φ'⟩``.
        centred: ``(n, n_v)`` float64 ``⟨Φ_c, Φ'_c⟩``.
        self_raw, self_centred: ``(n,)`` ``‖Φ‖²`` and ``‖Φ_c‖²``.
        tokens: ``(n,)`` counted positions; loss: ``(n,)`` mean token loss (nats).
        valid_self_raw, valid_self_centred, valid_tokens: ``(n_v,)``, the same of the validation side.
    """

    raw: np.ndarray
    centred: np.ndarray
    self_raw: np.ndarray
    self_centred: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    valid_self_raw: np.ndarray
    valid_self_centred: np.ndarray
    valid_tokens: np.ndarray


def _cosine(m: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    denom = np.sqrt(np.outer(np.maximum(a, 0), np.maximum(b, 0)))
    return np.divide(m, denom, out=np.zeros_like(m), where=denom > 0)


def _mean_nearest(m: np.ndarray, k: int, loo: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row means and means of the ``k`` largest entries; ``loo`` leaves out the diagonal (self pairs)."""
    if loo:
        n = m.shape[1]
        if n < 2:
            raise ValuegateError("the suspect reference needs at least 2 validation samples")
        eye = np.eye(m.shape[0], n, dtype=bool)
        mean = (m.sum(1) - np.where(eye, m, 0).sum(1)) / (n - 1)
        m = np.where(eye, -np.inf, m)
        k = min(k, n - 1)
    else:
        mean = m.mean(1)
        k = min(k, m.shape[1])
    top = -np.partition(-m, k - 1, axis=1)[:, :k]
    return mean, top.mean(1)


def signals_from_terms(t: CrossTerms, k: int, loo: bool = False, prefix: str = "") -> dict[str, np.ndarray]:
    """Every base signal of :data:`BASE_SIGNALS` from the cross terms.

    Args:
        t: the terms. k: nearest-k. loo: the rows are the validation samples themselves (leave self out).
        prefix: prepended to the names (``"hard_"``).

    Returns:
        name → ``(n,)`` float64.
    """
    if t.raw.shape[1] == 0:
        raise ValuegateError("the validation set is empty")
    out: dict[str, np.ndarray] = {}
    out["value_mean"], out["value_nearest"] = _mean_nearest(t.raw, k, loo)
    cos = _cosine(t.raw, t.self_raw, t.valid_self_raw)
    out["cosine_mean"], out["cosine_nearest"] = _mean_nearest(cos, k, loo)
    per_tok = t.raw / np.outer(np.maximum(t.tokens, 1), np.maximum(t.valid_tokens, 1))
    out["per_token_mean"], _ = _mean_nearest(per_tok, 1, loo)
    out["centred_value_mean"], _ = _mean_nearest(t.centred, 1, loo)
    ccos = _cosine(t.centred, t.self_centred, t.valid_self_centred)
    out["centred_cosine_mean"], out["centred_cosine_nearest"] = _mean_nearest(ccos, k, loo)
    out["log_self_influence"] = np.log(np.maximum(t.self_raw, 1e-300))
    out["mean_loss"] = np.asarray(t.loss, dtype=np.float64)
    return {prefix + name: out[name] for name in BASE_SIGNALS}


# --------------------------------------------------------------------------------------------------
# Exact path: token blocks.
# --------------------------------------------------------------------------------------------------


def _block_loss(block: TokenBlock) -> tuple[np.ndarray, np.ndarray]:
    tokens = torch.bincount(block.sample, minlength=block.n_samples).cpu().numpy().astype(np.int64)
    loss = torch.zeros(block.n_samples, dtype=torch.float64).index_add_(
        0, block.sample.cpu(), -block.log_likelihood.double().cpu()).numpy()
    return tokens, loss / np.maximum(tokens, 1)


def cross_terms_exact(block: TokenBlock, valid: TokenBlock, valid_centred: TokenBlock, mu: torch.Tensor,
                      valid_self: tuple[np.ndarray, np.ndarray]) -> CrossTerms:
    """:class:`CrossTerms` of a block of samples with the exact kernels.

    Args:
        block: the samples' counted positions (one token selection).
        valid, valid_centred: the validation block and the same with ``h − μ``.
        mu: ``(d,)`` the mean validation hidden state.
        valid_self: ``(‖Φ'‖², ‖Φ'_c‖²)`` of the validation samples.
    """
    centred = block.centred(mu)
    tokens, loss = _block_loss(block)
    v_tokens = torch.bincount(valid.sample, minlength=valid.n_samples).cpu().numpy().astype(np.int64)
    return CrossTerms(
        raw=exact_cross(block, valid).cpu().numpy(), centred=exact_cross(centred, valid_centred).cpu().numpy(),
        self_raw=exact_self(block).numpy(), self_centred=exact_self(centred).numpy(), tokens=tokens, loss=loss,
        valid_self_raw=valid_self[0], valid_self_centred=valid_self[1], valid_tokens=v_tokens)


# --------------------------------------------------------------------------------------------------
# Sparse path: CSR rows of stored features.
# --------------------------------------------------------------------------------------------------


@dataclass
class SparseSet:
    """Sparse rows of ``n`` samples for one token selection, flat, ready for CSR products.

    Attributes:
        token_ids: ``(Σ|U|,)`` int64, every sample's support, concatenated.
        lengths: ``(n,)`` int64 support sizes.
        rows: ``(Σ|U| · width,)`` float32 rows ``R`` (row-major per sample).
        error_sum: ``(Σ|U|,)`` float32 ``Σ_t a_t[U]`` aligned with ``token_ids``.
        width: ``k_h`` (or ``d``). vocab: ``V``.
        tokens: ``(n,)`` counted positions. loss: ``(n,)`` mean token loss.
    """

    token_ids: np.ndarray
    lengths: np.ndarray
    rows: np.ndarray
    error_sum: np.ndarray
    width: int
    vocab: int
    tokens: np.ndarray
    loss: np.ndarray

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.lengths.shape[0])

    @staticmethod
    def from_features(feats: list[SparseFeatures], vocab: int) -> SparseSet:
        """From in-memory features (the ``valuegate score`` path)."""
        width = feats[0].rows.shape[1] if feats else 0

        def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
            return np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt)

        return SparseSet(
            token_ids=cat([f.token_ids for f in feats], np.int64),
            lengths=np.array([f.token_ids.shape[0] for f in feats], dtype=np.int64),
            rows=cat([f.rows.reshape(-1) for f in feats], np.float32),
            error_sum=cat([f.error_sum for f in feats], np.float32),
            width=width, vocab=vocab,
            tokens=np.array([f.n_tokens for f in feats], dtype=np.int64),
            loss=np.array([f.mean_loss for f in feats], dtype=np.float64))

    @staticmethod
    def from_arrow(t, vocab: int, width: int, prefix: str = "") -> SparseSet:
        """From a slice of a feature table (columns ``[prefix]token_ids``, ``rows``, ``error_sum``,
        ``n_tokens``, ``mean_loss``), in the row order of the slice, as the store's readers return it (float32
        rows, feature format 6); every product runs in float64 (:meth:`matrix`)."""
        tok = t.column(prefix + "token_ids").combine_chunks()

        def flat(name: str) -> np.ndarray:
            return t.column(prefix + name).combine_chunks().values.to_numpy(zero_copy_only=False)

        return SparseSet(
            token_ids=tok.values.to_numpy(zero_copy_only=False).astype(np.int64),
            lengths=np.diff(tok.offsets.to_numpy()).astype(np.int64),
            rows=flat("rows").astype(np.float32, copy=False),
            error_sum=flat("error_sum").astype(np.float32, copy=False),
            width=width, vocab=vocab,
            tokens=t.column(prefix + "n_tokens").to_numpy().astype(np.int64),
            loss=t.column(prefix + "mean_loss").to_numpy().astype(np.float64))

    def matrix(self, centre: np.ndarray | None = None) -> sp.csr_matrix:
        """``(n, V·width)`` float64 CSR of the rows; with ``centre`` (``(width,)``, ``P_h μ``) the rows of
        the centred representation ``R − error_sum ⊗ centre``."""
        w = self.width
        data = self.rows.astype(np.float64)
        if data.size != self.token_ids.size * w:
            raise ValuegateError(f"feature rows hold {data.size} values for {self.token_ids.size} support "
                                 f"entries × width {w}: the feature table is corrupt")
        if centre is not None:
            data = (data.reshape(-1, w) - self.error_sum.astype(np.float64)[:, None] * centre[None, :]).reshape(-1)
        indices = (self.token_ids[:, None] * w + np.arange(w)[None, :]).reshape(-1)
        indptr = np.concatenate([[0], np.cumsum(self.lengths * w)]).astype(np.int64)
        return sp.csr_matrix((data, indices, indptr), shape=(self.n, max(self.vocab, 1) * max(w, 1)))


def _row_norms(m: sp.csr_matrix) -> np.ndarray:
    return np.asarray(m.multiply(m).sum(1)).reshape(-1)


@dataclass
class ValidSide:
    """The validation set's rows as the right-hand side of every product (built once per scoring run)."""

    raw: sp.csr_matrix
    centred: sp.csr_matrix
    self_raw: np.ndarray
    self_centred: np.ndarray
    tokens: np.ndarray
    centre: np.ndarray

    @staticmethod
    def build(valid: SparseSet, centre: np.ndarray) -> ValidSide:
        """``centre``: ``(width,)`` the projected mean validation hidden state ``P_h μ``."""
        raw, cen = valid.matrix(), valid.matrix(centre)
        return ValidSide(raw, cen, _row_norms(raw), _row_norms(cen), valid.tokens, centre)


def cross_terms_sparse(s: SparseSet, v: ValidSide) -> CrossTerms:
    """:class:`CrossTerms` of a set of samples against the validation side, on the sparse rows."""
    raw, cen = s.matrix(), s.matrix(v.centre)
    return CrossTerms(raw=sparse_cross_csr(raw, v.raw), centred=sparse_cross_csr(cen, v.centred),
                      self_raw=_row_norms(raw), self_centred=_row_norms(cen), tokens=s.tokens, loss=s.loss,
                      valid_self_raw=v.self_raw, valid_self_centred=v.self_centred, valid_tokens=v.tokens)


# --------------------------------------------------------------------------------------------------
# The reference's size.
# --------------------------------------------------------------------------------------------------


def check_reference_size(n_valid: int, what: str) -> None:
    """Refuse a validation set too small for the suspect score.

    The fault detectors' reference pool holds the validation samples (and a sample of the training rows); with
    fewer than :data:`MIN_REFERENCE` validation samples the target the values are computed against is too thin
    to mean anything, and a pool of two rows has no spread (issue 15: two samples once gave a suspect score of
    5.9e13 that a gate then passed). So this is an error, not a fallback.

    Args:
        n_valid: validation samples. what: the validation file or ``name@vN``, for the message.

    Raises:
        ValuegateError: ``n_valid < MIN_REFERENCE`` (one line naming ``what``).
    """
    if n_valid < MIN_REFERENCE:
        raise ValuegateError(
            f"{what}: {n_valid} validation sample{'s' if n_valid != 1 else ''}; the suspect score needs at least "
            f"{MIN_REFERENCE} to estimate the spread of clean data on every signal. Add validation samples, or "
            "set score.signals = false (values only, no suspect score)")
