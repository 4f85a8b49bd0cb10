"""Selection policy: which scored samples a release keeps, each decision with its reason."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from valuegate.engine.baseline_registry import baseline_policies
from valuegate.errors import ValuegateError
from valuegate.reasons import RANKED, REASON_FORMS, UNLIKE, Reason, ReasonForm, kinds_of, register_reason
from valuegate.settings import SelectSettings, Settings
from valuegate.storage.scores import read_score_run
from valuegate.storage.store import open_store

# only the steps after scoring run this module: it stays out of the cached steps' code fingerprint
# (valuegate.flows.after_scoring)
AFTER_SCORING = True


def select_samples(scored: pl.DataFrame, cfg: SelectSettings) -> pl.DataFrame:
    """Add ``keep`` (bool), ``reason`` (str, a sentence; empty when kept) and ``reason_code`` (str, a short code
    from a fixed vocabulary a person can count: :func:`reason_codes`; empty when kept) to a table of scored
    samples. Each drop is a :class:`valuegate.reasons.Reason` (its code and parameters), ``reason`` its words.

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
        reason = _words(code, [{"why": w or UNLIKE, "suspect": x, "threshold": cfg.suspect_threshold}
                               for x, w in zip(sus, why, strict=True)])
    elif cfg.policy == "keep_all":
        keep = np.ones(n, dtype=bool)
        reason = [""] * n
        code = reason
    elif cfg.policy == "drop_negative":
        keep = values >= 0
        code = ["" if k else "negative_value" for k in keep]
        reason = _words(code, [{"value": v} for v in values])
    elif cfg.policy == "threshold":
        keep = values >= cfg.threshold
        code = ["" if k else "below_threshold" for k in keep]
        reason = _words(code, [{"value": v, "threshold": cfg.threshold} for v in values])
    elif cfg.policy == "top_fraction":
        k = math.ceil(cfg.fraction * n - 1e-9)
        order = np.lexsort((scored["id"].to_numpy(), -values))  # by value desc, then id
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
        cut = values[order[k - 1]] if k else float("inf")
        code = ["" if kk else "not_in_top" for kk in keep]
        reason = _words(code, [{"value": v, "fraction": cfg.fraction, "cut": cut} for v in values])
    elif cfg.policy in baseline_policies():
        keep, reason, code = _baseline_selection(scored, cfg)
    elif cfg.policy == "random":
        k = math.ceil(cfg.fraction * n - 1e-9)
        keys = np.array([hashlib.sha256(f"{cfg.seed}:{i}".encode()).hexdigest() for i in scored["id"].to_list()])
        keep = np.zeros(n, dtype=bool)
        keep[np.argsort(keys, kind="stable")[:k]] = True
        code = ["" if kk else "not_sampled" for kk in keep]
        reason = _words(code, [{"fraction": cfg.fraction, "seed": cfg.seed}] * n)
    else:  # pragma: no cover - the settings model forbids it
        raise ValuegateError(f"unknown selection policy {cfg.policy!r}")
    return scored.with_columns(pl.Series("keep", keep), pl.Series("reason", reason, dtype=pl.String),
                               pl.Series("reason_code", code, dtype=pl.String))


def _words(codes: list[str], params: list[dict[str, Any]]) -> list[str]:
    """The ``reason`` column: each dropped row's :class:`Reason` (its code, its parameters) in words."""
    return [Reason(c, p).words() if c else "" for c, p in zip(codes, params, strict=True)]


def _baseline_reasons() -> None:
    """Each registered baseline policy's drop reason, ``not_in_<rank>_<policy>``, with the words of its rank
    (:data:`valuegate.reasons.RANKED`); a baseline registered later gets its form when it is first used."""
    for b in baseline_policies().values():
        if b.drop_code not in REASON_FORMS:
            register_reason(ReasonForm(b.drop_code, *RANKED[b.rank]))


_baseline_reasons()


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
    _baseline_reasons()
    code = ["" if kk else "no_ifd" if cfg.policy == "ifd" and nl
            else "ifd_at_least_1" if cfg.policy == "ifd" and v >= 1.0 else baseline.drop_code
            for kk, v, nl in zip(keep, x, null, strict=True)]
    reason = _words(code, [{"value": v, "fraction": cfg.fraction, "column": col, "cut": cut} for v in x])
    return keep, reason, code


def reason_codes() -> tuple[str, ...]:
    """The reason codes select_samples writes (besides the fault detectors' codes, valuegate.engine.faults):
    its own and each registered baseline policy's."""
    own = ("negative_value", "below_threshold", "not_in_top", "not_sampled")
    return (*own, *(c for b in baseline_policies().values() for c in (*b.reason_codes, b.drop_code)), "suspect")


def reason_kinds(selected: pl.DataFrame, policy: SelectSettings | Mapping[str, Any]) -> list[str]:
    """Each row's drop reason without the sample's own numbers ("" when kept), so that reasons can be counted:
    ``value -0.3 < 0`` → ``value < 0``; a detector's ``the answer stops ... (cut: suspect 4.1 > 3)`` → ``cut: the
    answer stops ...``. Rendered from the row's ``reason_code`` (and ``suspect_reason``) and the ``policy``'s
    parameters (the select settings, or the release manifest's ``policy``), never read back out of the words.

    A table without ``reason_code`` (not written by :func:`select_samples`) has no codes: its kinds are its
    reasons as they stand."""
    # a manifest's policy of an older valuegate may lack a parameter: the settings' default stands in
    policy = {**SelectSettings().model_dump(), **(policy.model_dump() if isinstance(policy, SelectSettings) else policy)}
    if "reason_code" not in selected.columns:
        return selected["reason"].fill_null("").to_list()
    keep = selected["keep"].to_list()
    codes = ["" if k else c for k, c in zip(keep, selected["reason_code"].fill_null("").to_list(), strict=True)]
    whys = (selected["suspect_reason"].fill_null("").to_list() if "suspect_reason" in selected.columns
            else [""] * selected.height)
    name = policy.get("policy")
    _baseline_reasons()
    baselines = baseline_policies()
    params = {"fraction": policy.get("fraction"), "threshold": policy.get("threshold"),
              "column": baselines[name].column if name in baselines else None}
    return kinds_of(codes, whys, params)


def dropped_reason_counts(selected: pl.DataFrame, policy: SelectSettings | Mapping[str, Any]) -> dict[str, int]:
    """``{reason kind: dropped samples}`` of a :func:`select_samples` table under ``policy``, most frequent
    first."""
    kinds = reason_kinds(selected, policy)
    counts = Counter(k for k, kept in zip(kinds, selected["keep"].to_list(), strict=True) if not kept)
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
    metas = read_members(open_store(settings.workspace), settings.data.dataset,
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
    scored = read_score_run(open_store(settings.workspace), run_id, settings.data.dataset)
    return select_samples(scored, settings.select)
