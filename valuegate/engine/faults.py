"""Named fault detectors: what is wrong with a training row, in words (issue 27).

The For-Value ``value`` says what a row is worth for the validation target (selection). Faults are a separate
question: is the row *broken*? Each detector tests one mechanism a broken row leaves in the forward pass, on
one side only, against rows like it:

=============  ==========================================================  ===============================
detector       mechanism (statistic, higher = more suspect)                 what it catches
=============  ==========================================================  ===============================
``mismatch``   ``log(mean_loss / uncond_loss)``: the prompt does not make   an answer moved from another row,
               the answer easier (IFD near 1, pointwise mutual              an answer to another question
               information near 0)
``echo``       ``prompt_overlap`` (the longest verbatim run of the prompt  the prompt copied back as the
               in the answer, as a share of the answer), with the answer   answer
               *easier* than like rows (``−log self-influence``); a
               difference under 0.1 means nothing (``min_spread``)
``garbled``    ``hard_mean_loss + mean_loss``: the surprisal of the answer  scrambled words (every token
               with its hardest 20% of tokens counted twice; a mean over    harder), injected junk tokens
               the answer's tokens, so its deviation is weighed by          (the hardest ones)
               ``sqrt(n_tokens / the pool's median)`` (its noise falls as
               ``1/sqrt(n)``: a short answer's mean wanders more)
``cut``        ``sqrt(end_loss)``, ``end_loss = −log p(end of answer)``     a truncated answer
               where the answer stops; its spread grows with its level
               (tasks whose answers end surely: near 0; answers that
               could go on: several nats), far less on the square root
=============  ==========================================================  ===============================

**Dense reference.** "Like rows" are a row's ``k`` nearest rows of a reference *pool*: the validation samples
and a seeded sample of the training rows themselves (most training rows are clean; a median of neighbours and
a median absolute deviation tolerate a large contaminated share), by the cosine of their centred mean hidden
states. A detector's deviation is the row's statistic minus its neighbours' median, divided by the robust
spread of the pool rows' own deviations from *their* neighbours (leave one out). Tasks then judge their rows by
their own standard: a terse answer is compared with terse answers.

**Calibration.** What a *clean* deviation looks like is read from the rows known to be clean, the validation samples
(each compared with its own pool neighbours, leave one out): a detector's score is the row's deviation less their
median deviation, over their robust spread, positive side only, and divided by the ratio of their upper
``CALIBRATION_QUANTILE`` score to what a normal gives there (never below 1; the clean bulk of real data has heavier
tails than a normal on some statistics), so that at the default threshold each detector flags about the same small
share of clean rows whatever its tails. The pool's training rows set the *location* (the neighbours' median, which a
broken share does not move) but not the spread: a quarter of them broken, of any kind (junk also raises IFD), would
inflate it and shrink every score. ``suspect`` is the largest calibrated detector score, ``fault`` the detector that
gives it, and ``suspect_reason`` its sentence. Other combinations (sum, Fisher's, Bonferroni's), locations (the
pool's median, shrunk neighbourhoods, a trimmed pool), calibration scales, a length weighting, rows found alike by
the prompt instead of the answer, a line break or a sentence stop counted as the end of an answer,
``end_loss`` itself for ``cut`` (the default before: on a training set of several tasks whose validation rows are
all of one task, the calibration reads that task's spread, and up to 14% of the clean rows were dropped) or its
log (as robust, but it squeezes truncated answers under the threshold), spreads read from each row's own
neighbourhood (noisier: more cells missed and clean rows dropped on one-task sets) and 25, 50 or 200 neighbours were
measured and chosen leave-one-set-out and leave-one-fault-out, then scored on mixtures of tasks; none beat this one
on the set or fault it was not chosen on, nor on three runs it was never tuned on, nor on the mixtures
(``tests/benchmarks/bench_faults_variants``, docs/benchmarks.md). A user who knows the
fault scores its detector alone (``score.suspect = ["mismatch"]``): alone, the meant detector often matches the
one-line filter that ``suspect`` loses to.

What the default model cannot perceive: a wrong final number in a worked answer changes one token the 135M
model barely predicts either way; no detector here sees it (docs/benchmarks.md, "Fault detection (issue 27)").

Adding a detector is one :class:`Detector` and one :func:`register` call (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from valuegate.engine.columns import FAULT_CODES, FAULT_SCORE_COLUMNS
from valuegate.errors import ValuegateError

__all__ = [
    "CALIBRATION_QUANTILE",
    "DETECTORS",
    "FAULT_INPUTS",
    "MIN_TRUSTED",
    "Detector",
    "FaultReference",
    "FaultScores",
    "check_codes",
    "detect",
    "detector_names",
    "fault_columns",
    "most_similar",
    "pool_sample",
    "reference_of",
    "register",
    "statistics",
    "verdict",
]

# the per-row inputs the built-in detectors read (feature columns of the store, SparseFeatures fields)
FAULT_INPUTS = ("mean_loss", "uncond_loss", "hard_mean_loss", "max_loss", "end_loss", "prompt_overlap",
                "self_influence", "n_tokens")
CALIBRATION_QUANTILE = 0.9
# fewest trusted (validation) rows the tail calibration is read from; below it, from the whole pool at 0.95
MIN_TRUSTED = 20
POOL_QUANTILE = 0.95
_EPS = 1e-6


@dataclass(frozen=True)
class Detector:
    """One fault: a one-sided statistic of per-row inputs and the words that say it.

    Attributes:
        code: the short name a person counts (``reason_code``), e.g. ``"cut"``.
        reason: one sentence a person understands, e.g. ``"the answer stops before it is finished"``.
        inputs: the per-row input columns it reads (:data:`FAULT_INPUTS` or any column the caller passes).
        statistic: inputs → ``(n,)`` float64, higher = more suspect; NaN where it does not apply (the row
            then gets no score from this detector).
        min_spread: the smallest spread a deviation is divided by, in the statistic's own units: the least
            difference from like rows that means anything (a statistic that is 0 on most rows has a robust
            spread near 0, and any small difference would be a large score).
        token_mean: the statistic is a mean over the answer's tokens, whose noise falls as ``1/sqrt(n_tokens)``:
            a deviation is weighed by ``sqrt(n_tokens / the pool's median n_tokens)``, so that short and long
            answers (and validation rows of another length than the training rows) share one spread. Reads the
            ``n_tokens`` input where the caller passes it (every valuegate path does), else weighs by 1.
    """

    code: str
    reason: str
    inputs: tuple[str, ...]
    statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    min_spread: float = 0.0
    token_mean: bool = False


DETECTORS: dict[str, Detector] = {}


def register(detector: Detector) -> Detector:
    """Add a detector to :data:`DETECTORS` (its ``code`` becomes a name ``score.suspect`` accepts)."""
    DETECTORS[detector.code] = detector
    return detector


def detector_names() -> list[str]:
    """The registered detectors' codes, in registration order."""
    return list(DETECTORS)


def _log(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, np.log(np.maximum(x, 1e-300)), np.nan)


register(Detector(
    "mismatch", "the answer does not depend on the question: the model finds it as likely without the prompt",
    ("mean_loss", "uncond_loss"), lambda f: _log(f["mean_loss"] + _EPS) - _log(f["uncond_loss"] + _EPS)))
register(Detector(
    "echo", "the answer repeats the question instead of answering it",
    ("prompt_overlap", "self_influence"),
    lambda f: np.asarray(f["prompt_overlap"], dtype=np.float64) - 0.1 * _log(f["self_influence"]),
    min_spread=0.1))
register(Detector(
    "garbled", "the answer has words or tokens that make no sense where they stand (scrambled or inserted)",
    ("hard_mean_loss", "mean_loss"),
    lambda f: np.asarray(f["hard_mean_loss"], dtype=np.float64) + np.asarray(f["mean_loss"], dtype=np.float64),
    token_mean=True))
register(Detector(
    "cut", "the answer stops before it is finished",
    ("end_loss",), lambda f: np.sqrt(np.maximum(np.asarray(f["end_loss"], dtype=np.float64), 0.0))))


def _floats(values) -> np.ndarray:
    """``(n,)`` float64 of a per-row input column (an array, or a list with None for null: NaN)."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(np.float64, copy=False)
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _unit_rows(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64) - centre
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _neighbours(unit: np.ndarray, pool_unit: np.ndarray, k: int, self_index: np.ndarray | None,
                rows: int = 4096) -> np.ndarray:
    """``(n, k)`` indices of each row's ``k`` most similar pool rows (never itself: ``self_index[i]`` is row
    i's position in the pool or −1). Chunked over rows, so memory stays ``rows × m``."""
    m = pool_unit.shape[0]
    k = max(1, min(k, m - 1 if self_index is not None and (self_index >= 0).any() else m))
    out = np.empty((unit.shape[0], k), dtype=np.int64)
    for lo in range(0, unit.shape[0], rows):
        sim = unit[lo:lo + rows] @ pool_unit.T
        if self_index is not None:
            own = self_index[lo:lo + rows]
            hit = np.flatnonzero(own >= 0)
            sim[hit, own[hit]] = -np.inf
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < m else np.broadcast_to(np.arange(m), sim.shape)
        order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
        out[lo:lo + rows] = np.take_along_axis(part, order, 1)
    return out


def most_similar(hidden: np.ndarray, others: np.ndarray) -> np.ndarray:
    """``(n,)`` int64: for each row, the index of the row of ``others`` most like it, by the cosine of their
    mean hidden states centred on ``others``' mean (the likeness the fault reference's neighbourhoods use).

    Args:
        hidden: ``(n, d)`` mean hidden states. others: ``(m, d)``, ``m ≥ 1``.
    """
    others = np.asarray(others, dtype=np.float64)
    centre = others.mean(0)
    return _neighbours(_unit_rows(hidden, centre), _unit_rows(others, centre), 1, None)[:, 0]


def _spread(dev: np.ndarray) -> float:
    """Robust spread ``1.4826 · MAD`` of finite deviations; the standard deviation, then 1, when that is 0."""
    d = dev[np.isfinite(dev)]
    if d.size == 0:
        return 1.0
    s = 1.4826 * float(np.median(np.abs(d - np.median(d))))
    if not s > 1e-12:
        s = float(d.std())
    return s if s > 1e-12 else 1.0


@dataclass
class FaultReference:
    """What clean rows look like to every detector: a pool of rows (validation samples and a sample of the
    training rows), their statistics, neighbourhoods, spreads and tail calibration.

    Attributes:
        codes: the detectors, in order. k: neighbours per row.
        centre: ``(d,)`` the pool's mean hidden state. pool_unit: ``(m, d)`` the pool's centred unit hidden
            states. stats: code → ``(m,)`` the pool's statistics. scale: code → the robust spread of the
            pool's leave-one-out deviations. tail: code → the tail calibration factor (≥ 1). offset: code → the
            median of those deviations (a neighbourhood's median is biased when the statistic is skewed).
            n_median: the pool's median ``n_tokens`` (the unit of a ``token_mean`` detector's weight).
    """

    codes: list[str]
    k: int
    centre: np.ndarray
    pool_unit: np.ndarray
    stats: dict[str, np.ndarray]
    scale: dict[str, float] = field(default_factory=dict)
    tail: dict[str, float] = field(default_factory=dict)
    offset: dict[str, float] = field(default_factory=dict)
    n_median: float = 1.0

    def weight(self, code: str, inputs: Mapping[str, np.ndarray], n: int) -> np.ndarray | float:
        """``(n,)`` what a row's deviation is weighed by: ``sqrt(n_tokens / n_median)`` for a ``token_mean``
        detector (1 where ``n_tokens`` is missing), else 1."""
        if not DETECTORS[code].token_mean or "n_tokens" not in inputs:
            return 1.0
        tokens = _floats(inputs["n_tokens"])[:n]
        return np.where(np.isfinite(tokens), np.sqrt(np.maximum(tokens, 1.0) / self.n_median), 1.0)

    @staticmethod
    def build(inputs: Mapping[str, np.ndarray], hidden: np.ndarray, codes: list[str], k: int,
              trusted: np.ndarray | None = None) -> FaultReference:
        """The reference of a pool.

        Args:
            inputs: column → ``(m,)`` the pool rows' inputs. hidden: ``(m, d)`` their mean hidden states.
            codes: detectors (:data:`DETECTORS` keys). k: neighbours per row.
            trusted: ``(m,)`` bool, the pool rows known to be clean (the validation samples). When there are at
                least :data:`MIN_TRUSTED`, what a clean deviation looks like (its median, spread and tail) is
                read from them alone: the training rows of a pool may hold a large broken share, and broken
                rows of other kinds move this detector's statistic too (junk raises IFD), which would inflate
                its spread and shrink every score. Else from the whole pool, the tail at :data:`POOL_QUANTILE`.

        Raises:
            ValuegateError: an unknown detector, a missing input column, or a pool of fewer than 3 rows.
        """
        check_codes(codes)
        hidden = np.asarray(hidden, dtype=np.float64)
        if hidden.shape[0] < 3:
            raise ValuegateError(f"the fault reference needs at least 3 rows; it has {hidden.shape[0]}")
        centre = hidden.mean(0)
        ref = FaultReference(list(codes), int(k), centre, _unit_rows(hidden, centre), {})
        ref.stats = statistics(inputs, codes)
        if "n_tokens" in inputs and any(DETECTORS[c].token_mean for c in codes):
            tokens = _floats(inputs["n_tokens"])
            ref.n_median = float(np.nanmedian(tokens)) if np.isfinite(tokens).any() else 1.0
            ref.n_median = max(ref.n_median, 1.0)
        own = np.arange(hidden.shape[0])
        nb = _neighbours(ref.pool_unit, ref.pool_unit, ref.k, own)
        use = np.ones(hidden.shape[0], dtype=bool) if trusted is None else np.asarray(trusted, dtype=bool)
        if use.sum() < MIN_TRUSTED:
            use, quantile = np.ones(hidden.shape[0], dtype=bool), POOL_QUANTILE
        else:
            quantile = CALIBRATION_QUANTILE
        for c in codes:
            x = ref.stats[c]
            dev = ((x - _location(x, nb)) * ref.weight(c, inputs, len(x)))[use]
            ref.offset[c] = float(np.nanmedian(dev)) if np.isfinite(dev).any() else 0.0
            ref.scale[c] = max(_spread(dev), DETECTORS[c].min_spread)
            z = (dev - ref.offset[c]) / ref.scale[c]
            z = z[np.isfinite(z)]
            q = float(np.quantile(z, quantile)) if z.size else 0.0
            ref.tail[c] = max(1.0, q / NormalDist().inv_cdf(quantile))
        return ref

    def scores(self, inputs: Mapping[str, np.ndarray], hidden: np.ndarray,
               self_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Calibrated one-sided scores, code → ``(n,)`` float64 ≥ 0 (NaN where the detector does not apply).

        Args:
            inputs: column → ``(n,)``. hidden: ``(n, d)``. self_index: ``(n,)`` each row's position in the
                pool, or −1 (a row is never its own neighbour).
        """
        nb = _neighbours(_unit_rows(hidden, self.centre), self.pool_unit, self.k, self_index)
        stats = statistics(inputs, self.codes)
        out = {}
        for c in self.codes:
            dev = ((stats[c] - _location(self.stats[c], nb)) * self.weight(c, inputs, len(stats[c]))
                   - self.offset.get(c, 0.0))
            z = dev / self.scale[c] / self.tail[c]
            out[c] = np.where(np.isfinite(z), np.maximum(z, 0.0), np.nan)
        return out


def _location(pool_stat: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """``(n,)`` the median of each row's neighbours' statistic (NaN-aware; NaN when none applies)."""
    vals = pool_stat[nb]
    out = np.full(vals.shape[0], np.nan)
    some = np.isfinite(vals).any(axis=1)
    if some.any():
        out[some] = np.nanmedian(vals[some], axis=1)
    return out


def check_codes(codes: list[str]) -> None:
    """Refuse unknown detector names (one line listing the known ones)."""
    unknown = [c for c in codes if c not in DETECTORS]
    if unknown or not codes:
        raise ValuegateError(f"score.suspect: unknown fault detector {unknown[0]!r}; known: "
                             f"{', '.join(DETECTORS)}" if unknown else "score.suspect: name at least one fault "
                             f"detector ({', '.join(DETECTORS)})")


def statistics(inputs: Mapping[str, np.ndarray], codes: list[str]) -> dict[str, np.ndarray]:
    """code → ``(n,)`` float64 statistic of each detector (NaN where it does not apply)."""
    out = {}
    for c in codes:
        det = DETECTORS[c]
        missing = [name for name in det.inputs if name not in inputs]
        if missing:
            raise ValuegateError(f"fault detector {c!r} needs the {missing[0]!r} column; extract the features "
                                 "again with this valuegate")
        cols = {name: _floats(inputs[name]) for name in det.inputs}
        with np.errstate(all="ignore"):
            out[c] = np.asarray(det.statistic(cols), dtype=np.float64)
    return out


@dataclass
class FaultScores:
    """The detectors' verdict on n rows.

    Attributes:
        scores: code → ``(n,)`` calibrated score (NaN: not applicable). suspect: ``(n,)`` the largest score
            (0 when none applies). fault: ``(n,)`` the code of that detector (None when every score is 0 or
            NaN). reason: ``(n,)`` its sentence (None likewise).
    """

    scores: dict[str, np.ndarray]
    suspect: np.ndarray
    fault: list[str | None]
    reason: list[str | None]


def detect(ref: FaultReference, inputs: Mapping[str, np.ndarray], hidden: np.ndarray,
           self_index: np.ndarray | None = None) -> FaultScores:
    """Score rows against the reference (see the module docstring).

    Args:
        inputs: column → ``(n,)`` per-row inputs. hidden: ``(n, d)`` mean hidden states.
        self_index: ``(n,)`` each row's position in the pool, or −1.
    """
    scores = ref.scores(inputs, hidden, self_index)
    n = np.asarray(hidden).shape[0]
    if not ref.codes:
        return FaultScores({}, np.zeros(n), [None] * n, [None] * n)
    mat = np.stack([np.nan_to_num(scores[c], nan=0.0) for c in ref.codes], axis=1)
    best = mat.argmax(1)
    suspect = mat[np.arange(n), best]
    fault = [ref.codes[b] if s > 0 else None for b, s in zip(best, suspect, strict=True)]
    reason = [None if f is None else DETECTORS[f].reason for f in fault]
    return FaultScores(scores, suspect, fault, reason)


def fault_columns(result: FaultScores | None, n: int) -> dict[str, list]:
    """The scores-table columns of a verdict: ``suspect`` (float), ``fault`` (the detector's code),
    ``suspect_reason`` (its sentence) and ``fault_<code>`` of each built-in detector
    (:data:`~valuegate.engine.columns.FAULT_CODES`: its calibrated score, null where it does not apply or is
    not configured); every column null when ``result`` is None (suspect off)."""
    if result is None:
        none = [None] * n
        return {"suspect": none, "fault": none, "suspect_reason": none, **{c: none for c in FAULT_SCORE_COLUMNS}}
    cols: dict[str, list] = {"suspect": [float(x) for x in result.suspect], "fault": list(result.fault),
                             "suspect_reason": list(result.reason)}
    for code, name in zip(FAULT_CODES, FAULT_SCORE_COLUMNS, strict=True):
        col = result.scores.get(code)
        cols[name] = [None] * n if col is None else [None if not np.isfinite(x) else float(x) for x in col]
    return cols


def pool_sample(n: int, size: int, keys: list[str] | None = None) -> np.ndarray:
    """Which of ``n`` training rows join the reference pool: all when ``n <= size``, else the ``size`` rows of
    smallest ``sha256(key)`` (``keys``: the rows' ids; None: the row numbers), so the pool of a row set does
    not depend on its order. Returns sorted indices, ``(min(n, size),)`` int64."""
    import hashlib

    if n <= size:
        return np.arange(n, dtype=np.int64)
    keys = keys if keys is not None else [str(i) for i in range(n)]
    digest = np.array([hashlib.sha256(k.encode()).hexdigest() for k in keys])
    return np.sort(np.argsort(digest, kind="stable")[:size]).astype(np.int64)


def reference_of(train_inputs: Mapping[str, np.ndarray], train_hidden: np.ndarray,
                 valid_inputs: Mapping[str, np.ndarray], valid_hidden: np.ndarray, codes: list[str], k: int,
                 pool: np.ndarray) -> FaultReference:
    """The reference of a pool made of the training rows ``pool`` (indices) and every validation row (the
    pool's first ``len(pool)`` rows are those training rows, in that order; the validation rows calibrate the
    tails)."""
    names = sorted(set(train_inputs) & set(valid_inputs))
    inputs = {c: np.concatenate([np.asarray(train_inputs[c], dtype=np.float64)[pool],
                                 np.asarray(valid_inputs[c], dtype=np.float64)]) for c in names}
    hidden = np.concatenate([np.asarray(train_hidden, dtype=np.float64)[pool],
                             np.asarray(valid_hidden, dtype=np.float64)])
    trusted = np.r_[np.zeros(len(pool), dtype=bool), np.ones(len(valid_hidden), dtype=bool)]
    return FaultReference.build(inputs, hidden, codes, k, trusted)


def verdict(train_inputs: Mapping[str, np.ndarray], train_hidden: np.ndarray, valid_inputs: Mapping[str, np.ndarray],
            valid_hidden: np.ndarray, codes: list[str], k: int, pool_size: int) -> FaultScores:
    """The detectors' verdict on every training row of an in-memory set (``valuegate score``): the reference
    pool is a seeded sample of ``pool_size`` training rows (:func:`pool_sample`) and every validation row.

    Args:
        train_inputs, valid_inputs: column → ``(n,)`` / ``(n_v,)`` per-row inputs. train_hidden, valid_hidden:
            ``(n, d)`` / ``(n_v, d)`` mean hidden states. codes, k, pool_size: ``score.suspect``,
            ``score.suspect_neighbours``, ``score.fault_pool``.
    """
    n = len(train_hidden)
    pool = pool_sample(n, pool_size)
    ref = reference_of(train_inputs, train_hidden, valid_inputs, valid_hidden, codes, k, pool)
    self_index = np.full(n, -1, dtype=np.int64)
    self_index[pool] = np.arange(len(pool))
    return detect(ref, train_inputs, train_hidden, self_index)
