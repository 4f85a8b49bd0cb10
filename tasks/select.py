"""Selection policy: which scored samples a release keeps, each decision with its reason."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import polars as pl

from valuegate.errors import ValuegateError
from valuegate.settings import SelectSettings


def select_samples(scored: pl.DataFrame, cfg: SelectSettings) -> pl.DataFrame:
    """Add ``keep`` (bool) and ``reason`` (str, empty when kept) to a table of scored samples.

    Policies:

    - ``suspect``: drop ``suspect > suspect_threshold``: samples that lie far from what the validation set
      itself looks like on the value signals (robust z units; the reason names the deviations).
    - ``drop_negative``: drop ``value < 0``: to first order, a gradient step on such a sample raises the
      validation loss (its LM-head gradient points away from the validation gradients).
    - ``top_fraction``: keep the ``ceil(fraction · n)`` highest values (ties broken by id, so the choice
      is deterministic).
    - ``threshold``: keep ``value >= threshold``.
    - ``keep_all``: keep everything (a scoring-only release).

    Args:
        scored: at least ``id`` (str) and ``value`` (float) columns, one row per sample.
        cfg: the policy.

    Raises:
        ValuegateError: missing columns, or non-finite values (they must never be kept or dropped silently).
    """
    for col in ("id", "value"):
        if col not in scored.columns:
            raise ValuegateError(f"selection needs a {col!r} column; the scores have {scored.columns}")
    values = scored["value"].to_numpy().astype(np.float64)
    if not np.isfinite(values).all():
        bad = scored.filter(~pl.col("value").is_finite())["id"].head(3).to_list()
        raise ValuegateError(f"{int((~np.isfinite(values)).sum())} scores are not finite (e.g. {bad}); "
                             "re-extract those samples")
    n = scored.height
    if cfg.policy == "suspect":
        if "suspect" not in scored.columns or scored["suspect"].null_count() == scored.height:
            raise ValuegateError("the suspect policy needs the suspect score: score with score.signals on")
        sus = scored["suspect"].fill_null(float("inf")).to_numpy().astype(np.float64)
        why = (scored["suspect_reason"].fill_null("").to_list() if "suspect_reason" in scored.columns
               else [""] * n)
        keep = sus <= cfg.suspect_threshold
        reason = ["" if k else f"suspect {x:.3g} > {cfg.suspect_threshold:g} ({w})"
                  for k, x, w in zip(keep, sus, why, strict=True)]
    elif cfg.policy == "keep_all":
        keep = np.ones(n, dtype=bool)
        reason = [""] * n
    elif cfg.policy == "drop_negative":
        keep = values >= 0
        reason = ["" if k else f"value {v:.4g} < 0" for k, v in zip(keep, values, strict=True)]
    elif cfg.policy == "threshold":
        keep = values >= cfg.threshold
        reason = ["" if k else f"value {v:.4g} < threshold {cfg.threshold:g}"
                  for k, v in zip(keep, values, strict=True)]
    elif cfg.policy == "top_fraction":
        k = math.ceil(cfg.fraction * n - 1e-9)
        order = np.lexsort((scored["id"].to_numpy(), -values))  # by value desc, then id
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
        cut = values[order[k - 1]] if k else float("inf")
        reason = ["" if kk else f"not in the top {cfg.fraction:.0%} (value {v:.4g} < {cut:.4g})"
                  for kk, v in zip(keep, values, strict=True)]
    else:  # pragma: no cover - the settings model forbids it
        raise ValuegateError(f"unknown selection policy {cfg.policy!r}")
    return scored.with_columns(pl.Series("keep", keep), pl.Series("reason", reason, dtype=pl.String))


_REASON_KINDS: list[tuple[re.Pattern[str], str]] = [
    # "suspect 4.1 > 3 (mean_loss z=+4.1, ...)": the threshold and the largest deviation, with its direction
    (re.compile(r"^suspect \S+ > (?P<t>\S+) \((?P<s>\w+) z=\+"), "suspect > {t}: {s} high"),
    (re.compile(r"^suspect \S+ > (?P<t>\S+) \((?P<s>\w+) z=-"), "suspect > {t}: {s} low"),
    (re.compile(r"^suspect \S+ > (?P<t>\S+)"), "suspect > {t}"),
    (re.compile(r"^value \S+ < (?P<rest>.+)$"), "value < {rest}"),
    (re.compile(r"^(?P<top>not in the top \S+)"), "{top}"),
]


def reason_kind(reason: str) -> str:
    """A drop reason without the sample's own numbers, so that reasons can be counted: ``"value -0.3 < 0"``
    → ``"value < 0"``; ``"suspect 4.1 > 3 (mean_loss z=+4.1, ...)"`` → ``"suspect > 3: mean_loss high"``."""
    for pattern, template in _REASON_KINDS:
        m = pattern.match(reason)
        if m:
            return template.format(**m.groupdict())
    return reason


def dropped_reason_counts(selected: pl.DataFrame) -> dict[str, int]:
    """``{reason kind: dropped samples}`` of a :func:`select_samples` table, most frequent first."""
    counts = Counter(reason_kind(r) for r in selected.filter(~pl.col("keep"))["reason"].to_list())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
