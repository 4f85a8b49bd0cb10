"""How well a score finds rows known to be bad: ROC AUC per corruption type, for valuegate's scores and the
cheap filters a user would use instead (issue 18). Plain numpy; the release report and the benchmarks
(``bench_baselines`` and the tests) share it, so they measure the same thing.

A *known-bad column* marks each row clean or bad: a string (empty or null = clean, else the corruption
type, e.g. the demo's ``corruption`` = swap / copy / wrong), a boolean (true = bad, type ``bad``) or a
number (non-zero = bad).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from valuegate.engine.baseline_registry import registered

__all__ = ["DetectionRow", "bad_kinds", "detection_auc", "detection_rows", "flag_sides"]


def flag_sides() -> dict[str, tuple[float, str]]:
    """Each registered baseline column → (the side its filter drops: +1 high values are flagged, -1 low ones;
    the filter's label), the papers' use: perplexity drops the highest, IFD the highest (≥ 1 means the prompt
    does not help), RDS the least similar, length the shortest (:mod:`valuegate.engine.baseline_registry`)."""
    return {b.column: (b.flags, b.label) for b in registered()}


def detection_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``score`` (higher = positive) for the boolean ``positive`` labels; ties count half.

    Args:
        score: ``(n,)`` finite floats. positive: ``(n,)`` bool, with both classes present.
    """
    pos = np.asarray(positive, dtype=bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    r = rankdata(np.asarray(score, dtype=np.float64))
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bad_kinds(values: list) -> np.ndarray:
    """The corruption type of every row of a known-bad column (see the module docstring), ``""`` = clean.

    Returns:
        ``(n,)`` object array of str.
    """
    out = []
    for v in values:
        if v is None or v is False or v == "" or (isinstance(v, float) and np.isnan(v)):
            out.append("")
        elif v is True:
            out.append("bad")
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out.append("" if v == 0 else "bad")
        else:
            out.append(str(v))
    return np.asarray(out, dtype=object)


@dataclass(frozen=True)
class DetectionRow:
    """One score's detection AUCs.

    Attributes:
        score (str): the column. side (float): +1 high values are flagged, -1 low ones.
        auc (dict[str, float | None]): ``"all"`` (every bad row against the clean ones) and each corruption
            type (its rows against the clean ones) → AUC, None where the score is missing on either class.
        rows (int): rows with a finite score (a baseline can be null, e.g. IFD of a text sample).
    """

    score: str
    side: float
    auc: dict[str, float | None]
    rows: int


def detection_rows(scores: dict[str, tuple[np.ndarray, float]], kinds: np.ndarray) -> list[DetectionRow]:
    """The AUC of every score for every corruption type and for all of them.

    Rows where a score is not finite are left out of that score's AUCs (counted in ``rows``).

    Args:
        scores: name → ``((n,) values, side)``; ``side`` +1 if high values are flagged, -1 if low ones.
        kinds: ``(n,)`` from :func:`bad_kinds`.

    Returns:
        one :class:`DetectionRow` per score, in the order given.
    """
    kinds = np.asarray(kinds, dtype=object)
    types = sorted({k for k in kinds if k})
    out = []
    for name, (values, side) in scores.items():
        x = side * np.asarray(values, dtype=np.float64)
        ok = np.isfinite(x)
        aucs: dict[str, float | None] = {}
        for label in ("all", *types):
            bad = (kinds != "") if label == "all" else (kinds == label)
            m = ok & ((kinds == "") | bad)
            lab = bad[m]
            aucs[label] = detection_auc(x[m], lab) if 0 < lab.sum() < lab.size else None
        out.append(DetectionRow(name, float(side), aucs, int(ok.sum())))
    return out
