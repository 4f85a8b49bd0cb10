"""The gate: Great Expectations checks a candidate release must pass before it becomes current.

Every check is a real Great Expectations (GX 1.x) expectation, run by GX on a pandas frame:

========================  ==========================================================================
frame (one suite each)    expectations
========================  ==========================================================================
``candidate``             the required columns are present (``expect_table_columns_to_match_set``);
                          each present required column has no nulls (NaN counts as null); ``id`` is
                          unique; ``value`` (and ``suspect`` where present) lie between ±float64 max
                          (fails on ±inf).
``release_metrics``       one row: ``retained_fraction`` (candidate rows / scored rows) within the
                          settings' bounds; ``quarantine_rate`` (quarantined / ingested rows) at most the
                          bound; ``valset`` pinned (``name@vN``); ``valset_rows`` at least the bound.
``group_retention``       one row per group of ``group_by`` (index = group name): ``retention`` (kept /
                          scored rows of the group) at least ``min_group_retention``.
========================  ==========================================================================

GX treats NaN as missing: ``expect_column_values_to_be_between`` skips it, so a NaN ``value`` fails the
not-null expectation and a ±inf ``value`` fails the between expectation. A required column that is absent
fails only the columns expectation; the column-level expectations on it are left out of the suite (they
could only raise "column does not exist").

GX runs in its own file project rooted at ``docs_dir`` (``docs_dir/gx``): suites, validation definitions,
checkpoints and validation results are stored there and every run rebuilds the suites from the settings
(``add_or_update``), so re-running into the same ``docs_dir`` works and its Data Docs list every run. One
checkpoint per frame (GX passes the same ``batch_parameters`` to every validation definition of a
checkpoint, and each frame is a different dataframe), each with an ``UpdateDataDocsAction``; the Data Docs
index lands at ``docs_dir/gx/uncommitted/data_docs/local_site/index.html``.

GX keeps process-wide state (the current context, its loggers), so gate runs in one process are serialised
by a lock; runs into different ``docs_dir`` never share a GX project. Progress bars are off, GX's loggers
are held at WARNING unless their level was set by the caller, and analytics are off
(``GX_ANALYTICS_ENABLED=False`` before GX is imported, and ``analytics_enabled: false`` in the project).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import polars as pl

from valuegate.engine.progress import Progress, use_progress_interval
from valuegate.errors import ValuegateError
from valuegate.settings import GateSettings, Settings

# only the steps after scoring run this module: it stays out of the cached steps' code fingerprint
# (valuegate.flows.after_scoring)
AFTER_SCORING = True

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DOCS_INDEX", "PINNED_VALSET", "GateInput", "GateResult", "gate_frames", "gate_suites", "run_gate"]

PINNED_VALSET = r"^[^@]+@v[0-9]+$"
"""A pinned validation-set reference: ``name@vN``."""

GX_DIR = "gx"
"""GX's project folder under ``docs_dir`` (what ``get_context(mode="file", project_root_dir=...)`` makes)."""

DOCS_INDEX = Path(GX_DIR, "uncommitted", "data_docs", "local_site", "index.html")
"""Where GX writes the Data Docs index, relative to ``docs_dir`` (read back from GX, never assumed)."""

DOCS_SITE = "local_site"
"""The Data Docs site of a GX file project (its default)."""

SUITE_PREFIX = "valuegate_gate_"
DATASOURCE = "valuegate_gate"
_GROUP_INDEX = "group"
_NULL_GROUP = "<null>"
_FLOAT_MAX = sys.float_info.max

_GX_LOCK = threading.Lock()
_log = logging.getLogger(__name__)


@dataclass
class GateInput:
    """What the gate looks at.

    Attributes:
        candidate: the rows the release would keep, ``(n_kept, ...)``: at least ``id`` (str) and ``value``
            (float, For-Value), plus data columns.
        scored: every scored row, ``(n_scored, ...)``: ``id``, ``value`` and the ``group_by`` column when set.
        group_by: column whose per-group retention is checked; None skips that check.
        ingested_rows: rows read from the sources (kept + quarantined).
        quarantined_rows: rows refused at ingestion.
        valset: the validation set scored against, pinned as ``name@vN``; ``""`` or no ``@v`` = not pinned.
        valset_rows: rows of that validation-set version.
        required_columns: columns the candidate must have, each without nulls.
    """

    candidate: pl.DataFrame
    scored: pl.DataFrame
    group_by: str | None
    ingested_rows: int
    quarantined_rows: int
    valset: str
    valset_rows: int
    required_columns: tuple[str, ...] = ("id", "value")


@dataclass
class GateResult:
    """The gate's verdict.

    Attributes:
        passed: every expectation succeeded.
        failures: one line per failed expectation: ``name: observed ...; expected ...``.
        results: every expectation, in suite order: ``{"suite", "name", "success", "observed", "bound"}``
            (``observed`` is JSON-serialisable: a number, a string, a list or a small dict).
        docs_index: the Data Docs ``index.html`` written for this validation (None if GX wrote none).
        seconds: wall time of the run (GX's first import in a process adds a few seconds).
        metrics: the one-row metrics GX checked: ``retained_fraction``, ``quarantine_rate`` (fractions),
            ``valset`` (str), ``valset_rows`` (int).
    """

    passed: bool
    failures: list[str]
    results: list[dict]
    docs_index: Path | None
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for a release manifest)."""
        return {"passed": self.passed, "failures": list(self.failures), "results": list(self.results),
                "docs_index": str(self.docs_index) if self.docs_index else None,
                "seconds": self.seconds, "metrics": dict(self.metrics)}


# --------------------------------------------------------------------------------------------- frames


def _fraction(num: int, den: int, what: str) -> float:
    if num < 0 or den < 0:
        raise ValuegateError(f"gate: negative row count for {what} ({num} of {den})")
    if den == 0:
        raise ValuegateError(f"gate: {what} is undefined because there are no rows to divide by "
                             "(nothing was scored or ingested): check the sources and the selection")
    return num / den


def _kept_per_group(inp: GateInput, g: str) -> pl.DataFrame | None:
    """``(n_groups, 2)``: ``group`` (str), ``kept`` (int) — None when the candidate cannot be matched.

    Kept rows are the scored rows whose ``id`` is in the candidate (the scored group is authoritative);
    without ``id`` the candidate's own ``g`` column is counted.
    """
    if "id" in inp.candidate.columns and "id" in inp.scored.columns:
        ids = inp.candidate.select(pl.col("id").cast(pl.String)).unique()
        kept = inp.scored.with_columns(pl.col("id").cast(pl.String)).join(ids, on="id", how="semi")
    elif g in inp.candidate.columns:
        kept = inp.candidate
    else:
        return None  # the candidate lacks `id`: the columns expectation fails already
    return kept.group_by(pl.col(g).cast(pl.String).fill_null(_NULL_GROUP).alias(_GROUP_INDEX)).agg(
        pl.len().alias("kept"))


def gate_frames(inp: GateInput) -> dict[str, pd.DataFrame]:
    """The pandas frames GX validates (pure: no GX).

    Returns:
        ``{"candidate": (n_kept, n_required_present), "release_metrics": (1, 4),
        "group_retention": (n_groups, 3)}``; ``group_retention`` only when ``group_by`` is set and the
        candidate can be matched to the scored rows. ``release_metrics`` columns: ``retained_fraction``,
        ``quarantine_rate`` (floats), ``valset`` (str), ``valset_rows`` (int). ``group_retention`` is
        indexed by group name (str, nulls as ``"<null>"``) with ``scored``, ``kept`` (int) and
        ``retention`` (float) columns.

    Raises:
        ValuegateError: nothing scored or ingested, a negative count, or ``group_by`` not a scored column.
    """
    import pandas as pd

    present = [c for c in dict.fromkeys(inp.required_columns) if c in inp.candidate.columns]
    frames: dict[str, pd.DataFrame] = {"candidate": inp.candidate.select(present).to_pandas()}
    retained = _fraction(inp.candidate.height, inp.scored.height, "the retained fraction (candidate / scored)")
    quarantine = _fraction(inp.quarantined_rows, inp.ingested_rows,
                           "the quarantine rate (quarantined / ingested)")
    frames["release_metrics"] = pd.DataFrame({
        "retained_fraction": [float(retained)], "quarantine_rate": [float(quarantine)],
        "valset": [str(inp.valset or "")], "valset_rows": [int(inp.valset_rows)]})
    if inp.group_by is not None:
        if inp.group_by not in inp.scored.columns:
            raise ValuegateError(f"gate: group_by column {inp.group_by!r} is not in the scored rows "
                                 f"(columns: {inp.scored.columns}); set select.group_by to one of them")
        kept = _kept_per_group(inp, inp.group_by)
        if kept is not None:
            scored = inp.scored.group_by(
                pl.col(inp.group_by).cast(pl.String).fill_null(_NULL_GROUP).alias(_GROUP_INDEX)).agg(
                pl.len().alias("scored"))
            groups = (scored.join(kept, on=_GROUP_INDEX, how="left")
                      .with_columns(pl.col("kept").fill_null(0))
                      .with_columns((pl.col("kept") / pl.col("scored")).alias("retention"))
                      .sort(_GROUP_INDEX))
            frames["group_retention"] = groups.to_pandas().set_index(_GROUP_INDEX)
    return frames


# --------------------------------------------------------------------------------------------- suites


def gate_suites(frames: dict[str, pd.DataFrame], inp: GateInput, cfg: GateSettings) -> dict[str, list]:
    """The expectations of each frame, built fresh from the settings.

    Returns:
        ``{frame name: [gx expectation, ...]}`` for every frame of ``frames``.
    """
    import great_expectations as gx

    ex = gx.expectations
    present = set(frames["candidate"].columns)
    required = list(dict.fromkeys(inp.required_columns))
    candidate: list = [ex.ExpectTableColumnsToMatchSet(column_set=required, exact_match=False)]
    candidate += [ex.ExpectColumnValuesToNotBeNull(column=c) for c in required if c in present]
    if "id" in present:
        candidate.append(ex.ExpectColumnValuesToBeUnique(column="id"))
    for col in ("value", "suspect"):  # suspect may be null (signals off); never ±inf
        if col in present:
            candidate.append(ex.ExpectColumnValuesToBeBetween(column=col, min_value=-_FLOAT_MAX,
                                                              max_value=_FLOAT_MAX))
    suites: dict[str, list] = {"candidate": candidate, "release_metrics": [
        ex.ExpectColumnValuesToBeBetween(column="retained_fraction", min_value=cfg.min_retained_fraction,
                                         max_value=cfg.max_retained_fraction),
        ex.ExpectColumnValuesToBeBetween(column="quarantine_rate", max_value=cfg.max_quarantine_rate),
        ex.ExpectColumnValuesToMatchRegex(column="valset", regex=PINNED_VALSET),
        ex.ExpectColumnValuesToBeBetween(column="valset_rows", min_value=cfg.min_valset_rows),
    ]}
    if "group_retention" in frames:
        suites["group_retention"] = [
            ex.ExpectColumnValuesToBeBetween(column="retention", min_value=cfg.min_group_retention)]
    return suites


# --------------------------------------------------------------------------------------------- GX


def _quiet_gx() -> None:
    """Analytics off before GX is imported; GX's loggers at WARNING unless the caller set a level."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


def _open_context(docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    docs_dir.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(docs_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.variables.analytics_enabled = False
    context.variables.save()
    return context


def _checkpoint(context, frame: str, expectations: list):
    """A fresh suite + validation definition + checkpoint (with Data Docs update) for one frame."""
    import great_expectations as gx

    try:
        datasource = context.data_sources.get(DATASOURCE)
    except KeyError:
        datasource = context.data_sources.add_pandas(name=DATASOURCE)
    if frame in datasource.get_asset_names():
        asset = datasource.get_asset(frame)
    else:
        asset = datasource.add_dataframe_asset(name=frame)
    if "whole" in {b.name for b in asset.batch_definitions}:
        batch = asset.get_batch_definition("whole")
    else:
        batch = asset.add_batch_definition_whole_dataframe("whole")
    name = SUITE_PREFIX + frame
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    vd = context.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch,
                                                                              suite=suite))
    return context.checkpoints.add_or_update(gx.Checkpoint(
        name=name, validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs", site_names=[DOCS_SITE])],
        result_format="COMPLETE" if frame != "candidate" else "SUMMARY"))


def _docs_index(context) -> Path | None:
    for site in context.get_docs_sites_urls(site_name=DOCS_SITE):
        url = site.get("site_url")
        if url:
            path = Path(url2pathname(urlparse(url).path))
            if path.exists():
                return path
    return None


# --------------------------------------------------------------------------------------------- results


def _plain(v: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to strings."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _name(cfg) -> str:
    kw = cfg.kwargs
    arg = kw.get("column") or ", ".join(kw.get("column_set") or [])
    return f"{cfg.type}({arg})"


def _bound(cfg) -> str:
    kw = cfg.kwargs
    if cfg.type == "expect_table_columns_to_match_set":
        return f"columns include {list(kw['column_set'])}"
    if cfg.type == "expect_column_values_to_not_be_null":
        return "no nulls (NaN counts as null)"
    if cfg.type == "expect_column_values_to_be_unique":
        return "no duplicates"
    if cfg.type == "expect_column_values_to_match_regex":
        return f"matches {kw['regex']}"
    lo, hi = kw.get("min_value"), kw.get("max_value")
    if lo == -_FLOAT_MAX and hi == _FLOAT_MAX:
        return "finite (between ±float64 max)"
    if lo is not None and hi is not None:
        return f"between {lo:g} and {hi:g}"
    return f">= {lo:g}" if lo is not None else f"<= {hi:g}"


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for sub in info.values():
        if isinstance(sub, dict) and sub.get("raised_exception"):
            return str(sub.get("exception_message"))
    return None


def _observed(frame: str, er, inp: GateInput, metrics: dict[str, Any]) -> tuple[Any, str]:
    """(JSON-safe observed value, its one-line text) of one expectation result."""
    res = dict(er.result or {})
    error = _exception_message(er.exception_info)
    if error is not None:
        return {"error": error}, f"error: {error}"
    if er.expectation_config.type == "expect_table_columns_to_match_set":
        missing = (res.get("details") or {}).get("mismatched", {}).get("missing") or []
        obs = {"columns": _plain(res.get("observed_value")), "missing": _plain(missing)}
        return obs, f"missing columns {missing}" if missing else f"columns {obs['columns']}"
    if frame == "release_metrics":
        # one row: report the value itself (GX reports a map expectation by its unexpected rows only)
        column = er.expectation_config.kwargs["column"]
        value = metrics[column]
        if column == "retained_fraction":
            return value, f"{value:.4g} ({inp.candidate.height} of {inp.scored.height} scored rows kept)"
        if column == "quarantine_rate":
            return value, f"{value:.4g} ({inp.quarantined_rows} of {inp.ingested_rows} ingested rows quarantined)"
        return value, repr(value)
    if frame == "group_retention":
        rows = res.get("unexpected_index_list") or []
        failing = {str(r.get(_GROUP_INDEX)): _plain(r.get("retention")) for r in rows if isinstance(r, dict)}
        text = ", ".join(f"{g} ({v:.3g})" if isinstance(v, float) else f"{g} ({v})"
                         for g, v in failing.items())
        return ({"failing_groups": failing, "groups": _plain(res.get("element_count"))},
                f"groups below the floor: {text}" if failing else f"{res.get('element_count')} groups")
    obs = {"unexpected_count": _plain(res.get("unexpected_count")),
           "element_count": _plain(res.get("element_count")),
           "examples": _plain(list(res.get("partial_unexpected_list") or [])[:5])}
    return obs, (f"{obs['unexpected_count']} of {obs['element_count']} rows unexpected, "
                 f"e.g. {obs['examples']}")


def _metric_values(frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
    row = frames["release_metrics"].iloc[0]
    return {k: _plain(row[k]) for k in frames["release_metrics"].columns}


# --------------------------------------------------------------------------------------------- entry


def run_gate(inp: GateInput, cfg: GateSettings, docs_dir: Path) -> GateResult:
    """Validate a candidate release with Great Expectations and build its Data Docs.

    Args:
        inp: the candidate, the scored rows and the run's counts (see :class:`GateInput`).
        cfg: the thresholds.
        docs_dir: root of the GX file project of this validation; created if missing, reused if present.

    Returns:
        the verdict, one line per failed expectation, every expectation's observation and the Data Docs
        index (``docs_dir/gx/uncommitted/data_docs/local_site/index.html``).

    Raises:
        ValuegateError: nothing scored or ingested, a negative count, ``group_by`` not a scored column.
    """
    t0 = time.perf_counter()
    frames = gate_frames(inp)
    metrics = _metric_values(frames)
    _quiet_gx()
    with _GX_LOCK:
        context = _open_context(Path(docs_dir))
        suites = gate_suites(frames, inp, cfg)
        runs = []
        bar = Progress(len(suites) + 1, "gate", unit="step", bar=False)  # each suite, then the Data Docs
        for frame, expectations in suites.items():
            checkpoint = _checkpoint(context, frame, expectations)
            runs.append((frame, checkpoint.run(batch_parameters={"dataframe": frames[frame]})))
            bar.update()
        docs_index = _docs_index(context)
        bar.update()
        bar.close()

    results: list[dict] = []
    failures: list[str] = []
    for frame, cp_result in runs:
        for vr in cp_result.run_results.values():
            for er in vr.results:
                name, bound = _name(er.expectation_config), _bound(er.expectation_config)
                observed, text = _observed(frame, er, inp, metrics)
                success = bool(er.success)
                results.append({"suite": SUITE_PREFIX + frame, "name": name, "success": success,
                                "observed": observed, "bound": bound})
                if not success:
                    failures.append(f"{name}: observed {text}; expected {bound}")
    passed = bool(results) and all(r["success"] for r in results)
    seconds = time.perf_counter() - t0
    _log.info("gate %s in %.2fs (%d expectations, %d failed)", "passed" if passed else "FAILED", seconds,
              len(results), len(failures))
    return GateResult(passed=passed, failures=failures, results=results, docs_index=docs_index,
                      seconds=seconds, metrics=metrics)


def run(settings: Settings, selected: pl.DataFrame, counts: dict[str, int], valset: dict[str, Any],
        docs_dir: str | Path) -> GateResult:
    """The ``gate`` step of the refresh DAG: Great Expectations on the candidate release.

    Args:
        selected: the scored samples with the selection's ``keep``. counts: the ingest step's counts
            (``dataset_rows``, ``dataset_quarantined``). valset: the pinned validation version (``valset``,
            ``rows``). docs_dir: where the Data Docs are rendered.
    """
    use_progress_interval(settings.progress_seconds)
    inp = GateInput(candidate=selected.filter(selected["keep"]), scored=selected, group_by=settings.select.group_by,
                    ingested_rows=counts["dataset_rows"] + counts["dataset_quarantined"],
                    quarantined_rows=counts["dataset_quarantined"],
                    valset=valset["valset"], valset_rows=valset["rows"])
    return run_gate(inp, settings.gate, Path(docs_dir))
