"""Selection policy: which scored samples a release keeps, each decision with its reason."""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

import numpy as np
import polars as pl

from valuegate.engine.baseline_registry import baseline_policies
from valuegate.errors import ValuegateError
from valuegate.settings import SelectSettings, Settings
from valuegate.storage.lance import Workspace
from valuegate.storage.scores import read_score_run


def select_samples(scored: pl.DataFrame, cfg: SelectSettings) -> pl.DataFrame:
    """Add ``keep`` (bool), ``reason`` (str, a sentence; empty when kept) and ``reason_code`` (str, a short code
    from a fixed vocabulary a person can count: :func:`reason_codes`; empty when kept) to a table of scored
    samples.

    Policies:

    - ``suspect``: drop ``suspect > suspect_threshold``: a fault detector fired (:mod:`valuegate.engine.faults`;
      calibrated robust z units). ``reason_code`` is the detector (``mismatch``, ``echo``, ``garbled``, ``cut``),
      ``reason`` its sentence.
    - ``drop_negative``: drop ``value < 0``: to first order, a gradient step on such a sample raises the
      validation loss (its LM-head gradient points away from the validation gradients).
    - ``top_fraction``: keep the ``ceil(fraction · n)`` highest values (ties broken by id, so the choice
      is deterministic).
    - ``threshold``: keep ``value >= threshold``.
    - ``keep_all``: keep everything (a scoring-only release).

    The baselines (:mod:`valuegate.engine.baselines`), each keeping at most ``k = ceil(fraction · n)`` samples
    (ties broken by id), with the semantics of the papers they come from:

    - ``ifd``: the ``k`` highest ``ifd`` among the samples with ``ifd < 1`` (Cherry LLM / Superfiltering:
      at ``ifd >= 1`` the prompt does not help predict the response; such samples and those without an IFD,
      text samples, are dropped with that reason, so fewer than ``k`` may be kept).
    - ``perplexity``: the ``k`` lowest ``perplexity`` (a perplexity filter drops the highest).
    - ``rds``: the ``k`` highest ``rds_mean`` (RDS+: the most similar to the validation set).
    - ``length``: the ``k`` longest (``length``, counted tokens).
    - any baseline registered with a policy (:mod:`valuegate.engine.baseline_registry`): the ``k`` best by
      its column as it ranks (``top``, ``lowest``, ``longest``).
    - ``random``: ``k`` samples at random: those of smallest ``sha256(f"{seed}:{id}")``, so the same
      ``seed`` keeps the same ids whatever the order of the rows.

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
        fault = scored["fault"].fill_null("").to_list() if "fault" in scored.columns else [""] * n
        keep = sus <= cfg.suspect_threshold
        code = ["" if k else (f or "suspect") for k, f in zip(keep, fault, strict=True)]
        reason = ["" if k else f"{w or 'unlike the validation set'} ({c}: suspect {x:.3g} > {cfg.suspect_threshold:g})"
                  for k, x, w, c in zip(keep, sus, why, code, strict=True)]
    elif cfg.policy == "keep_all":
        keep = np.ones(n, dtype=bool)
        reason = [""] * n
        code = reason
    elif cfg.policy == "drop_negative":
        keep = values >= 0
        reason = ["" if k else f"value {v:.4g} < 0" for k, v in zip(keep, values, strict=True)]
        code = ["" if k else "negative_value" for k in keep]
    elif cfg.policy == "threshold":
        keep = values >= cfg.threshold
        reason = ["" if k else f"value {v:.4g} < threshold {cfg.threshold:g}"
                  for k, v in zip(keep, values, strict=True)]
        code = ["" if k else "below_threshold" for k in keep]
    elif cfg.policy == "top_fraction":
        k = math.ceil(cfg.fraction * n - 1e-9)
        order = np.lexsort((scored["id"].to_numpy(), -values))  # by value desc, then id
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
        cut = values[order[k - 1]] if k else float("inf")
        reason = ["" if kk else f"not in the top {cfg.fraction:.0%} (value {v:.4g} < {cut:.4g})"
                  for kk, v in zip(keep, values, strict=True)]
        code = ["" if kk else "not_in_top" for kk in keep]
    elif cfg.policy in baseline_policies():
        keep, reason, code = _baseline_selection(scored, cfg)
    elif cfg.policy == "random":
        k = math.ceil(cfg.fraction * n - 1e-9)
        keys = np.array([hashlib.sha256(f"{cfg.seed}:{i}".encode()).hexdigest() for i in scored["id"].to_list()])
        keep = np.zeros(n, dtype=bool)
        keep[np.argsort(keys, kind="stable")[:k]] = True
        reason = ["" if kk else f"not in the random {cfg.fraction:.0%} (seed {cfg.seed})" for kk in keep]
        code = ["" if kk else "not_sampled" for kk in keep]
    else:  # pragma: no cover - the settings model forbids it
        raise ValuegateError(f"unknown selection policy {cfg.policy!r}")
    return scored.with_columns(pl.Series("keep", keep), pl.Series("reason", reason, dtype=pl.String),
                               pl.Series("reason_code", code, dtype=pl.String))


def _baseline_selection(scored: pl.DataFrame, cfg: SelectSettings) -> tuple[np.ndarray, list[str], list[str]]:
    """``keep`` ``(n,)``, the reasons and the reason codes of a baseline policy (see :func:`select_samples`)."""
    baseline = baseline_policies()[cfg.policy]  # the column it reads, how the kept ones rank
    col, rank = baseline.column, baseline.rank
    if col not in scored.columns:
        raise ValuegateError(f"select.policy = {cfg.policy} needs the {col!r} column; the scores have "
                             f"{scored.columns} (score the data again with this valuegate)")
    s = scored[col].cast(pl.Float64)
    x = s.fill_null(float("nan")).to_numpy().astype(np.float64)
    null = s.is_null().to_numpy()
    bad = ~np.isfinite(x) & (~null if cfg.policy == "ifd" else True)
    if bad.any():
        ids = [i for i, b in zip(scored["id"].to_list(), bad, strict=True) if b][:3]
        raise ValuegateError(f"{int(bad.sum())} {col} values are null or not finite (e.g. {ids}); "
                             "score the data again with this valuegate")
    n = scored.height
    k = math.ceil(cfg.fraction * n - 1e-9)
    eligible = ~null & (x < 1.0) if cfg.policy == "ifd" else np.ones(n, dtype=bool)
    cand = np.flatnonzero(eligible)
    ids = scored["id"].to_numpy()
    order = cand[np.lexsort((ids[cand], x[cand] if rank == "lowest" else -x[cand]))]
    keep = np.zeros(n, dtype=bool)
    keep[order[:k]] = True
    cut = x[order[min(k, len(order)) - 1]] if len(order) and k else float("nan")
    share = f"{cfg.fraction:.0%}"
    reason, code = [], []
    for kk, v, nl in zip(keep, x, null, strict=True):
        code.append("" if kk else "no_ifd" if cfg.policy == "ifd" and nl
                    else "ifd_at_least_1" if cfg.policy == "ifd" and v >= 1.0 else baseline.drop_code)
        if kk:
            reason.append("")
        elif cfg.policy == "ifd" and nl:
            reason.append("no ifd (no prompt)")
        elif cfg.policy == "ifd" and v >= 1.0:
            reason.append(f"ifd {v:.4g} >= 1 (the prompt does not help)")
        elif rank == "lowest":
            reason.append(f"not in the lowest {share} by {col} ({col} {v:.4g} > {cut:.4g})")
        elif rank == "longest":
            reason.append(f"not in the longest {share} ({col} {v:.4g} < {cut:.4g})")
        else:
            reason.append(f"not in the top {share} by {col} ({col} {v:.4g} < {cut:.4g})")
    return keep, reason, code


def reason_codes() -> tuple[str, ...]:
    """The reason codes select_samples writes (besides the fault detectors' codes, valuegate.engine.faults):
    its own and each registered baseline policy's."""
    own = ("negative_value", "below_threshold", "not_in_top", "not_sampled")
    return (*own, *(c for b in baseline_policies().values() for c in (*b.reason_codes, b.drop_code)), "suspect")


_REASON_KINDS: list[tuple[re.Pattern[str], str]] = [
    # "the answer stops before it is finished (cut: suspect 4.1 > 3)": the detector and its sentence
    (re.compile(r"^(?P<w>.+) \((?P<c>\w+): suspect \S+ > \S+\)$"), "{c}: {w}"),
    (re.compile(r"^value \S+ < (?P<rest>.+)$"), "value < {rest}"),
    (re.compile(r"^(?P<top>not in the (?:top|lowest|longest|random) \S+(?: by \w+)?)"), "{top}"),
    (re.compile(r"^ifd \S+ >= 1 (?P<why>.*)$"), "ifd >= 1 {why}"),
]


def reason_kind(reason: str) -> str:
    """A drop reason without the sample's own numbers, so that reasons can be counted: ``"value -0.3 < 0"``
    → ``"value < 0"``; ``"the answer stops ... (cut: suspect 4.1 > 3)"`` → ``"cut: the answer stops ..."``."""
    for pattern, template in _REASON_KINDS:
        m = pattern.match(reason)
        if m:
            return template.format(**m.groupdict())
    return reason


def dropped_reason_counts(selected: pl.DataFrame) -> dict[str, int]:
    """``{reason kind: dropped samples}`` of a :func:`select_samples` table, most frequent first."""
    counts = Counter(reason_kind(r) for r in selected.filter(~pl.col("keep"))["reason"].to_list())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# the columns every scored row has besides its metadata (storage/scores.py: read_score_run)
ROW_COLUMNS = ("id", "kind", "prompt", "response", "messages", "text", "source", "row")


def check_group_by(settings: Settings) -> None:
    """Refuse a ``select.group_by`` that no row of the dataset has, before any extraction (the gate would
    find it only after the model ran).

    Raises:
        ValuegateError: one line naming the setting, the dataset and the columns its rows have.
    """
    import json

    from valuegate.storage.samples import read_members

    col = settings.select.group_by
    if not col or col in ROW_COLUMNS:
        return
    metas = read_members(Workspace.from_env(settings.workspace), settings.data.dataset,
                         columns=["metadata"])["metadata"].to_pylist()
    needle = json.dumps(col, ensure_ascii=False) + ":"
    if any(m and needle in m and col in json.loads(m) for m in metas):
        return
    seen = sorted({k for m in metas[:1000] if m for k in json.loads(m)})
    raise ValuegateError(f"select.group_by = {col!r}: no row of dataset {settings.data.dataset!r} has that column "
                         f"(its columns: {', '.join([*ROW_COLUMNS[1:], *seen])})")


def run(settings: Settings, run_id: str) -> pl.DataFrame:
    """The ``select`` step of the refresh DAG: the scores run ``run_id`` of ``settings.data.dataset`` joined
    with its samples (:func:`valuegate.storage.scores.read_score_run`), with the policy's ``keep`` and
    ``reason`` (:func:`select_samples`)."""
    scored = read_score_run(Workspace.from_env(settings.workspace), run_id, settings.data.dataset)
    return select_samples(scored, settings.select)
