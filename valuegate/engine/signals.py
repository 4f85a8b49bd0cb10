"""Per-sample signals beside the value, and the combined ``suspect`` score.

Different corruptions of fine-tuning data leave different, even opposite, traces in the For-Value
quantities (README, mislabeled-detection benchmark): a response moved from another task has a high loss
and a gradient that points away from every validation sample once the hidden states are centred; a
response that is *easier* than the right one (a copy of the input, a truncated answer) has a low loss and a
small gradient norm. So every sample gets a set of signals, each on all counted tokens and on the hardest
fraction of them (``hard_`` prefix):

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

``suspect`` needs no labels: the validation samples are scored against the rest of the validation set
(leave one out), which gives every signal a reference distribution of what *clean* data looks like. A
sample's deviation on a signal is a robust z-score of that reference, kept on the side(s) the signal is
configured with (``low``, ``high`` or ``two``), and the deviations combine by root mean square (or
maximum). The reference is *local* by default (:class:`SuspectReference`): a sample is compared with the
median of its ``k`` nearest validation samples (cosine of the centred mean hidden states: samples of the
same task), on the scale of the validation samples' own deviations from their nearest others. Tasks differ
a lot in loss and gradient norm; a pooled reference flags whole tasks of a mixed set and misses the
corruptions that are extreme only for their own task (mislabeled-detection benchmark: swaps 0.61 → 0.77,
truncations 0.95 → 0.99, held-out demo 0.69 → 0.79). ``score.suspect_neighbours = 0`` gives the pooled
``(x − median) / (1.4826 · MAD)``. That combination is finally expressed against the validation
samples' own combined scores (again a robust z-score), so ``suspect = 3`` reads "three robust standard
deviations more suspect than the validation set itself", whatever the number of signals combined.
Higher means more suspect.

Too small a reference: a validation set of fewer than :data:`MIN_REFERENCE` samples is refused with one line
naming it (:func:`check_reference_size`, called before any extraction), and a spread that is rounding noise
(validation scores equal up to ~1e-16) falls back to the standard deviation, then to 1, instead of dividing
by it. A local neighbourhood holds ``min(k, n_v − 1)`` samples, so never fewer than 2 once the set is big
enough.
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
    "FittedSuspect",
    "SparseSet",
    "SuspectReference",
    "calibrated_suspect",
    "check_reference_size",
    "combine_suspect",
    "cross_terms_exact",
    "cross_terms_sparse",
    "explain_suspect",
    "fit_suspect",
    "hidden_neighbours",
    "parse_suspect",
    "robust_z",
    "signal_names",
    "signals_from_terms",
    "suspect_deviations",
]

SIDES = ("low", "high", "two")
# Fewest validation samples the suspect reference is estimated from (see check_reference_size).
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
# The combined score.
# --------------------------------------------------------------------------------------------------


def parse_suspect(spec: list[str] | tuple[str, ...], available: list[str]) -> list[tuple[str, str]]:
    """``["mean_loss:two", ...]`` → ``[("mean_loss", "two"), ...]``, checked against the signals at hand.

    Raises:
        ValuegateError: a malformed entry, an unknown signal or side.
    """
    out = []
    for item in spec:
        name, _, side = str(item).partition(":")
        side = side or "two"
        if name not in available:
            raise ValuegateError(f"score.suspect: unknown signal {name!r}; available: {', '.join(available)}")
        if side not in SIDES:
            raise ValuegateError(f"score.suspect: side of {name!r} must be one of {SIDES}, not {side!r}")
        out.append((name, side))
    if not out:
        raise ValuegateError("score.suspect: name at least one SIGNAL:SIDE")
    return out


def check_reference_size(n_valid: int, what: str) -> None:
    """Refuse a validation set too small to be the suspect score's reference.

    The reference is a median and a median absolute deviation of the validation samples scored leave one
    out. With fewer than :data:`MIN_REFERENCE` samples there is no spread to estimate: two samples are
    each other's only reference, their combined scores are equal up to rounding by symmetry, and a robust
    z-score against them divides by ~1e-16 (a suspect score of 5.9e13 that a gate then passed). So this is
    an error, not a fallback: the numbers would mean nothing.

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


def _robust_scale(x: np.ndarray, centre: float) -> float:
    """``1.4826 · median|x − centre|``, falling back to the standard deviation, then to 1, when ``x`` is
    (nearly) constant: a spread below ``1e-9 ×`` the magnitude of the values is rounding noise, not a
    scale (dividing by it turns any difference into an astronomically large z-score)."""
    tol = 1e-9 * max(1.0, abs(centre), float(np.max(np.abs(x))) if x.size else 0.0)
    scale = 1.4826 * float(np.median(np.abs(x - centre)))
    if not scale > tol:
        scale = float(x.std())
        if not scale > tol:
            scale = 1.0
    return scale


def robust_z(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(x − median(ref)) / (1.4826 · MAD(ref))``; the scale falls back to the standard deviation, then 1,
    when the reference is constant up to rounding (spread below ``1e-9 ×`` its magnitude).

    Returns:
        ``x``'s shape, float64.
    """
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise ValuegateError("the suspect reference is empty (no finite validation signal)")
    med = float(np.median(ref))
    return (np.asarray(x, dtype=np.float64) - med) / _robust_scale(ref, med)


def hidden_neighbours(hidden: np.ndarray, valid_hidden: np.ndarray, mu: np.ndarray, k: int,
                      loo: bool = False) -> np.ndarray:
    """The ``k`` validation samples nearest each sample by the cosine of their centred mean hidden states.

    Args:
        hidden: ``(n, d)`` each sample's mean final hidden state over its counted positions.
        valid_hidden: ``(n_v, d)`` the same of the validation samples. mu: ``(d,)`` the centre (the mean
            validation hidden state).
        k: neighbours per sample (at most ``n_v``, or ``n_v − 1`` with ``loo``).
        loo: the samples are the validation samples themselves: a sample is never its own neighbour.

    Returns:
        ``(n, k)`` int64 indices into the validation set, nearest first (ties: lower index first).
    """
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64) - np.asarray(mu, dtype=np.float64)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)

    sim = unit(hidden) @ unit(valid_hidden).T
    n_v = sim.shape[1]
    if loo:
        if n_v < 2:
            raise ValuegateError("a local suspect reference needs at least 2 validation samples")
        np.fill_diagonal(sim, -np.inf)
    k = max(1, min(k, n_v - 1 if loo else n_v))
    return np.argsort(-sim, axis=1, kind="stable")[:, :k].astype(np.int64)


@dataclass
class SuspectReference:
    """What clean data looks like on every signal: the validation samples scored leave-one-out against the
    rest of the validation set, and how a sample is compared with them.

    *Global* (``neighbours`` None): a sample's deviation on a signal is its robust z-score against all the
    validation samples. *Local* (``neighbours`` ``(n_v, k)``): against the median of its ``k`` nearest
    validation samples (:func:`hidden_neighbours`), on the scale of the validation samples' own deviations
    from *their* nearest others' medians (leave one out). A validation set that mixes tasks (a family with a
    high loss beside one with a low loss) then judges every sample by its own task's standard, instead of
    flagging a whole family as unlike the pooled set.

    Attributes:
        signals: name → ``(n_v,)`` the validation samples' leave-one-out signals.
        neighbours: ``(n_v, k)`` int64 each validation sample's nearest other validation samples, or None.
    """

    signals: dict[str, np.ndarray]
    neighbours: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._scale: dict[str, float] = {}

    @staticmethod
    def of(reference: SuspectReference | dict[str, np.ndarray]) -> SuspectReference:
        """A reference as is, or a plain name → values mapping as a global reference."""
        return reference if isinstance(reference, SuspectReference) else SuspectReference(dict(reference))

    def location(self, name: str, neighbours: np.ndarray | None) -> np.ndarray | float:
        """The reference point of signal ``name`` for samples with ``neighbours`` (``(n, k)``): their
        neighbours' median (``(n,)``); the validation median when global."""
        ref = np.asarray(self.signals[name], dtype=np.float64)
        if self.neighbours is None:
            finite = ref[np.isfinite(ref)]
            if finite.size == 0:
                raise ValuegateError(f"the suspect reference of {name} is empty (no finite validation signal)")
            return float(np.median(finite))
        if neighbours is None:
            raise ValuegateError("a local suspect reference needs every sample's validation neighbours")
        return np.nanmedian(ref[neighbours], axis=1)

    def scale(self, name: str) -> float:
        """The robust spread of the validation samples around their own reference points."""
        if name not in self._scale:
            ref = np.asarray(self.signals[name], dtype=np.float64)
            dev = ref - self.location(name, self.neighbours)
            dev = dev[np.isfinite(dev)]
            if dev.size == 0:
                raise ValuegateError(f"the suspect reference of {name} is empty (no finite validation signal)")
            centre = 0.0 if self.neighbours is None else float(np.median(dev))
            self._scale[name] = _robust_scale(dev, centre)
        return self._scale[name]

    def z(self, name: str, x: np.ndarray, neighbours: np.ndarray | None) -> np.ndarray:
        """Signed robust z-scores ``(n,)`` of the values ``x`` of signal ``name``."""
        return (np.asarray(x, dtype=np.float64) - self.location(name, neighbours)) / self.scale(name)


def suspect_deviations(signals: dict[str, np.ndarray], reference: SuspectReference | dict[str, np.ndarray],
                       spec: list[tuple[str, str]],
                       neighbours: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-signal robust z-scores against the reference, and the deviations the spec counts.

    Args:
        neighbours: ``(n, k)`` the samples' nearest validation samples (a local reference needs them).

    Returns:
        ``z`` ``(n, S)`` signed z-scores and ``dev`` ``(n, S)`` ≥ 0: ``|z|`` for ``two``, the positive part of
        ``z`` for ``high`` and of ``−z`` for ``low``.
    """
    ref = SuspectReference.of(reference)
    zs, devs = [], []
    for name, side in spec:
        z = np.nan_to_num(ref.z(name, signals[name], neighbours), nan=0.0, posinf=1e6, neginf=-1e6)
        zs.append(z)
        devs.append(np.abs(z) if side == "two" else np.maximum(z if side == "high" else -z, 0.0))
    return np.stack(zs, axis=1), np.stack(devs, axis=1)


def combine_suspect(signals: dict[str, np.ndarray], reference: SuspectReference | dict[str, np.ndarray],
                    spec: list[tuple[str, str]], how: str = "rms",
                    neighbours: np.ndarray | None = None) -> np.ndarray:
    """The ``suspect`` score of every sample (higher = less like the validation set).

    Args:
        signals: name → ``(n,)`` of the samples scored. reference: the validation samples scored
            leave-one-out against the validation set (a plain mapping is a global reference).
        spec: ``(signal, side)`` pairs. how: ``rms`` or ``max``.
        neighbours: ``(n, k)`` the samples' nearest validation samples, for a local reference.

    Returns:
        ``(n,)`` float64, ≥ 0.
    """
    _, m = suspect_deviations(signals, reference, spec, neighbours)
    if how == "rms":
        return np.sqrt((m * m).mean(1))
    if how == "max":
        return m.max(1)
    raise ValuegateError(f"unknown suspect combination {how!r}: use rms or max")


def calibrated_suspect(signals: dict[str, np.ndarray], reference: SuspectReference | dict[str, np.ndarray],
                       spec: list[tuple[str, str]], how: str = "rms",
                       neighbours: np.ndarray | None = None) -> np.ndarray:
    """The suspect score on the scale of the validation set's own: :func:`combine_suspect` of the samples
    as a robust z-score of the same combination over the validation samples (``0`` = as suspect as the
    median validation sample, ``3`` = three robust standard deviations more suspect than the validation
    set itself). Monotone in :func:`combine_suspect`, so rankings and AUCs are the same.

    Returns:
        ``(n,)`` float64.
    """
    ref = SuspectReference.of(reference)
    own = combine_suspect(ref.signals, ref, spec, how, ref.neighbours)
    return robust_z(combine_suspect(signals, ref, spec, how, neighbours), own)


def explain_suspect(signals: dict[str, np.ndarray], reference: SuspectReference | dict[str, np.ndarray],
                    spec: list[tuple[str, str]], top: int = 2, neighbours: np.ndarray | None = None) -> list[str]:
    """Why each sample is (or is not) suspect: its largest counted deviations, e.g.
    ``"mean_loss z=+4.1, log_self_influence z=-2.3"``.

    Returns:
        one string per sample.
    """
    z, dev = suspect_deviations(signals, reference, spec, neighbours)
    order = np.argsort(-dev, axis=1, kind="stable")[:, :top]
    return [", ".join(f"{spec[j][0]} z={z[i, j]:+.1f}" for j in row) for i, row in enumerate(order)]


# --------------------------------------------------------------------------------------------------
# A combination fitted without labels: clean validation samples vs corrupted copies of them.
# --------------------------------------------------------------------------------------------------


@dataclass
class FittedSuspect:
    """A logistic combination of standardised signals (:func:`fit_suspect`); higher = more suspect.

    Attributes:
        names: the ``S`` feature names, in column order.
        centre, scale: ``(S,)`` the clean rows' medians and robust spreads (:func:`_robust_scale`).
        terms: the ``2S`` term names: ``name`` (the signed z) then ``|name|`` (its magnitude).
        weights: ``(2S,)`` float64 logistic weights of the terms. bias: the intercept.
        clip: z-scores are clipped to ``±clip`` before weighting (one wild value cannot dominate).
    """

    names: list[str]
    centre: np.ndarray
    scale: np.ndarray
    terms: list[str]
    weights: np.ndarray
    bias: float
    clip: float = 10.0

    def design(self, x: np.ndarray) -> np.ndarray:
        """``(n, 2S)`` terms of the raw features ``x`` ``(n, S)`` (non-finite values count as the centre)."""
        z = (np.asarray(x, dtype=np.float64) - self.centre) / self.scale
        z = np.clip(np.nan_to_num(z, nan=0.0, posinf=self.clip, neginf=-self.clip), -self.clip, self.clip)
        return np.concatenate([z, np.abs(z)], axis=1)

    def score(self, x: np.ndarray) -> np.ndarray:
        """``(n,)`` log-odds of "corrupted" of the rows ``x`` ``(n, S)``."""
        return self.design(x) @ self.weights + self.bias


def fit_suspect(clean: np.ndarray, corrupt: np.ndarray, names: list[str], l2: float = 0.01,
                clip: float = 10.0, monotone: bool = True, signed: bool = True) -> FittedSuspect:
    """Fit which signals, on which side, flag corrupted samples: an L2-regularised logistic regression of
    corrupted (1) vs clean (0), classes weighted equally, on every signal's robust z-score (standardised on
    the clean rows) and its magnitude (so a signal can flag both sides).

    With ``monotone`` the weights of the magnitudes are kept ``>= 0``: a sample that deviates more from
    clean data on any signal is never *less* suspect for it. An unconstrained fit learns such negative
    weights from the corruptions it sees (e.g. "an unusual gradient norm means clean", true of the swaps
    and wrong answers it was shown) and then misses a corruption type it was not shown whose mark is
    exactly that deviation. Without ``signed`` only the magnitudes count (the signed weights stay 0): a
    learnt weighting of the deviations, like the default root mean square of chosen sides.

    Meant for label-free calibration: ``clean`` are trusted validation samples scored against the rest of
    the validation set, ``corrupt`` copies of them damaged by known generators (truncated, swapped, ...).

    Args:
        clean: ``(n0, S)`` the clean rows' features (at least :data:`MIN_REFERENCE` rows).
        corrupt: ``(n1, S)`` the corrupted rows' features (at least one row).
        names: the ``S`` feature names.
        l2: penalty ``l2/2 · ‖w‖²`` on the weights (not the intercept), per unit of total class weight.
        clip: z-scores are clipped to ``±clip``.

    Returns:
        the fit; :meth:`FittedSuspect.score` gives the log-odds of new rows.

    Raises:
        ValuegateError: too few rows, or features that do not match ``names``.
    """
    from scipy.optimize import minimize

    clean = np.atleast_2d(np.asarray(clean, dtype=np.float64))
    corrupt = np.atleast_2d(np.asarray(corrupt, dtype=np.float64))
    s = len(names)
    if clean.shape[1] != s or corrupt.shape[1] != s:
        raise ValuegateError(f"fit_suspect: {len(names)} names for {clean.shape[1]} / {corrupt.shape[1]} columns")
    if clean.shape[0] < MIN_REFERENCE or corrupt.shape[0] < 1:
        raise ValuegateError(f"fit_suspect: needs at least {MIN_REFERENCE} clean and 1 corrupted rows; got "
                             f"{clean.shape[0]} and {corrupt.shape[0]}")
    centre = np.zeros(s)
    scale = np.ones(s)
    for j in range(s):
        col = clean[:, j][np.isfinite(clean[:, j])]
        if col.size:
            centre[j] = float(np.median(col))
            scale[j] = _robust_scale(col, centre[j])
    terms = list(names) + [f"|{n}|" for n in names]
    fit = FittedSuspect(list(names), centre, scale, terms, np.zeros(2 * s), 0.0, clip)
    x = np.concatenate([fit.design(clean), fit.design(corrupt)])
    y = np.concatenate([np.zeros(len(clean)), np.ones(len(corrupt))])
    w = np.where(y == 1, 0.5 / len(corrupt), 0.5 / len(clean))  # equal class weight, total 1

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = x @ theta[1:] + theta[0]
        # log(1 + e^t) − y t, stably, and its gradient (sigmoid(t) − y)
        nll = np.logaddexp(0.0, t) - y * t
        g = w * (0.5 * (1.0 + np.tanh(0.5 * t)) - y)
        reg = 0.5 * l2 * float(theta[1:] @ theta[1:])
        return float(w @ nll) + reg, np.concatenate([[g.sum()], x.T @ g + l2 * theta[1:]])

    bounds = [(None, None)] + [(None, None) if signed else (0.0, 0.0)] * s + [(0.0 if monotone else None, None)] * s
    res = minimize(loss, np.zeros(2 * s + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    fit.bias, fit.weights = float(res.x[0]), res.x[1:].copy()
    return fit
