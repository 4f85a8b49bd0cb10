"""The built-in baselines (issue 18), registered in :mod:`valuegate.engine.baseline_registry`; what they mean
and cite: :mod:`valuegate.engine.baselines` (which also runs IFD's pass of the responses alone).

numpy only. Columns in this order: ``perplexity``, ``length``, ``ifd``, ``rds_mean``, ``rds_max``.
"""

from __future__ import annotations

import math

import numpy as np

from valuegate.engine.baseline_registry import BaselineInputs, register

__all__ = ["ifd", "length", "perplexity", "rds_columns", "rds_max", "rds_mean", "unit_rows"]


@register("perplexity", flags=1.0, label="perplexity filter (drops high)", policy="perplexity", rank="lowest")
def perplexity(x: BaselineInputs) -> np.ndarray:
    """``exp(mean_loss)`` ``(n,)``."""
    return np.exp(np.asarray(x.mean_loss, dtype=np.float64))


@register("length", flags=-1.0, label="length filter (drops short)", dtype="int32", policy="length",
          rank="longest")
def length(x: BaselineInputs) -> np.ndarray:
    """The counted tokens ``(n,)`` int64."""
    return np.asarray(x.n_tokens, dtype=np.int64)


@register("ifd", flags=1.0, label="IFD filter (drops high)", policy="ifd", rank="top",
          reason_codes=("no_ifd", "ifd_at_least_1"))
def ifd(x: BaselineInputs) -> list[float | None]:
    """``mean_loss / uncond_loss`` ``(n,)``, None where the unconditional loss is undefined or not extracted."""
    loss = np.asarray(x.mean_loss, dtype=np.float64)
    if x.uncond_loss is None:
        return [None] * len(loss)
    u = np.array([np.nan if v is None else v for v in x.uncond_loss], dtype=np.float64)
    return [float(c / w) if math.isfinite(w) and w > 0 else None for c, w in zip(loss, u, strict=True)]


def _rds(x: BaselineInputs) -> tuple[np.ndarray, np.ndarray]:
    return x.shared("rds", lambda: rds_columns(x.hidden, x.valid_hidden))  # type: ignore[return-value]


@register("rds_mean", flags=-1.0, label="RDS+ mean similarity (drops low)", policy="rds", rank="top")
def rds_mean(x: BaselineInputs) -> np.ndarray:
    """The mean cosine with the validation samples ``(n,)``."""
    return _rds(x)[0]


@register("rds_max", flags=-1.0, label="RDS+ max similarity (drops low)")
def rds_max(x: BaselineInputs) -> np.ndarray:
    """The largest cosine with a validation sample ``(n,)``."""
    return _rds(x)[1]


def unit_rows(x: np.ndarray, dtype=np.float64) -> np.ndarray:
    """``(n, d)`` rows of ``x`` scaled to unit length in ``dtype`` (all-zero rows stay 0)."""
    x = np.asarray(x, dtype=dtype)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def rds_columns(train_hidden: np.ndarray, valid_hidden: np.ndarray, rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``rds_mean`` and ``rds_max`` ``(n,)`` float64 of pooled states ``(n, d)`` against ``(n_v, d)``.

    The mean of the cosines is the product with the mean unit validation vector; the max needs every
    cosine. Both run in float32 (``rows`` training rows at a time): cosines within about 1e-6 of
    float64's, far inside the float16 the mean hidden states are stored in (feature format 7), at half
    the time and memory of float64 (the max's product is the largest cost of a signals-off mean scan
    after the reads, issue 19).
    """
    n = len(train_hidden)
    rds_mean, rds_max = np.full(n, np.nan), np.full(n, np.nan)
    if not len(valid_hidden):
        return rds_mean, rds_max
    v = unit_rows(valid_hidden)
    v_mean, v32 = v.mean(0).astype(np.float32), v.astype(np.float32).T
    for lo in range(0, n, rows):
        t = unit_rows(train_hidden[lo:lo + rows], np.float32)
        rds_mean[lo:lo + rows] = t @ v_mean
        rds_max[lo:lo + rows] = (t @ v32).max(1)
    return rds_mean, rds_max
