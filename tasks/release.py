"""Releases: the manifest, publishing, rollback, the diff between two releases and one-line summaries.

Pure functions over :mod:`valuegate.storage.releases` (which owns every file access); the refresh flow
wraps them in Prefect tasks.

How a diff knows its reasons. A release stores its kept rows (``data.parquet``: ``id``, ``value`` and the
content columns, the training columns only) and, beside them, the scores of every sample its run scored
(``scores.parquet``: ``id``, ``value``, ``kept``, ``suspect``, the per-signal columns and the drop
``reason``; so each release explains itself without the LanceDB ``scores`` table, which may be pruned or
live in another workspace), and its dataset card (``README.md``, :mod:`valuegate.dataset_card`). Between releases ``a`` and ``b``, an id *entered* when it is
kept in ``b`` but not in ``a`` and *left* in the opposite case; its reason is, first match wins:

1. ``new data``: the id was not scored by the other release's run (for an entered id: it arrived after
   ``a``; for a left id: it is no longer in the dataset at ``b``);
2. ``new validation version``: both runs scored it, but against different validation sets
   (``valset`` name@version of the manifests differ), so the values are not comparable;
3. ``value change`` (``suspect change`` when both releases select by the suspect score): same
   validation set, the score the policy reads or the policy's cut-off moved (a new model fingerprint, new
   settings, or for ``top_fraction`` the other samples around it); the examples give the old and the new
   score and the diff gives both cut-offs;
4. ``unknown``: the release that should say whether the id was scored was written without
   ``scores.parquet``.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from valuegate.dataset_card import card_extra, release_frames
from valuegate.errors import ValuegateError
from valuegate.settings import Settings
from valuegate.storage import releases as store
from valuegate.storage.objstore import open_root
from valuegate.storage.store import open_store
from valuegate.tasks.select import dropped_reason_counts

# only the steps after scoring run this module: it stays out of the cached steps' code fingerprint
# (valuegate.flows.after_scoring)
AFTER_SCORING = True

__all__ = [
    "REASONS",
    "ReleaseResult",
    "build_manifest",
    "diff_candidate",
    "diff_releases",
    "format_diff",
    "policy_cutoff",
    "publish_release",
    "release_summary",
    "rollback",
    "run",
    "staging_dir",
]

MANIFEST_FORMAT = 1
REASONS = ("new data", "new validation version", "value change", "suspect change", "unknown")


def build_manifest(*, name: str, version: str, run_id: str, inputs: list[dict[str, Any]], model_fp: str,
                   valset: str, policy: dict[str, Any], thresholds: dict[str, Any], gate: dict[str, Any],
                   counts: dict[str, int], settings: dict[str, Any]) -> dict[str, Any]:
    """The provenance record of one release (stored as its ``manifest.json``).

    Args:
        name: release name.
        version: the allocated version (``vNNNN``).
        run_id: the scoring run whose values the release was cut from (key of the ``scores`` table).
        inputs: one dict per source file: ``source`` (or ``path``) and ``sha256`` of its bytes.
        model_fp: model fingerprint of the features.
        valset: the pinned validation set, ``name@vN``.
        policy: the selection settings (``policy``, ``aggregate``, ``fraction``, ``threshold``, ...).
        thresholds: the gate's limits the release was checked against (``min_retained_fraction``, ...).
        gate: the verdict: ``passed`` (bool), ``failures`` (list of str) and anything else the gate reports
            (e.g. ``docs_index``).
        counts: step counts (ingested rows, quarantined, scored, released, ...).
        settings: the resolved settings as JSON-able data.

    Returns:
        the manifest: the arguments plus ``format`` (1), ``created`` (UTC ISO-8601 time, seconds) and
        ``data_sha256`` / ``scores_sha256`` (None here; :func:`valuegate.storage.releases.write_release`
        fills them from the written files).

    Raises:
        ValuegateError: an input without ``sha256`` or path, a gate without a boolean ``passed``, or a
            valset that is not ``name@vN``.
    """
    clean_inputs = []
    for i, item in enumerate(inputs):
        src = item.get("source", item.get("path"))
        if not src or not item.get("sha256"):
            raise ValuegateError(f"release input #{i} needs a source path and its sha256, got {item!r}")
        clean_inputs.append({**item, "source": str(src)})
    if not isinstance(gate.get("passed"), bool):
        raise ValuegateError(f"the gate verdict needs a boolean 'passed', got {gate!r}")
    if "@" not in valset:
        raise ValuegateError(f"validation set {valset!r}: the manifest needs the pinned name@vN")
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": store.format_version(store.parse_version(version)),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "inputs": clean_inputs,
        "model_fp": model_fp,
        "valset": valset,
        "policy": dict(policy),
        "thresholds": dict(thresholds),
        "gate": {**gate, "failures": [str(f) for f in gate.get("failures") or []]},
        "counts": dict(counts),
        "settings": settings,
        "data_sha256": None,
        "scores_sha256": None,
    }


def publish_release(root: Any, name: str, data: pl.DataFrame, *, scores: pl.DataFrame | None = None,
                    extra: dict[str, Path] | None = None, dropped: dict[str, int] | None = None,
                    **manifest_fields: Any) -> dict[str, Any]:
    """Allocate a version, write the release with its dataset card (``README.md``, see
    :mod:`valuegate.dataset_card`) and promote it when its gate passed.

    Args:
        root, name: workspace root (directory, s3:// URI or Store) and release name.
        data, scores, extra: as :func:`valuegate.storage.releases.write_release`.
        dropped: ``{reason: dropped samples}`` for the card.
        **manifest_fields: the keyword arguments of :func:`build_manifest` except ``name``/``version``.

    Returns:
        ``{"version": str, "current": bool, "previous": str | None}``: ``previous`` is the version this
        release replaced (what the promotion itself found current, not a read before it), or, when it did
        not become current, the version that stays current. A release that passed but found a newer one
        current (another publisher got there first) is not promoted, and the result adds ``reason``
        (``"not promoted: newer release vNNNN is current"``).
    """
    version = store.allocate_version(root, name)
    manifest = build_manifest(name=name, version=version, **manifest_fields)
    with tempfile.TemporaryDirectory(prefix="valuegate-card-") as tmp:
        card = card_extra(Path(tmp), manifest, data, dropped)
        store.write_release(root, name, version, data, manifest, {**(extra or {}), **card}, scores=scores)
    if not manifest["gate"]["passed"]:
        return {"version": version, "current": False, "previous": store.read_current(root, name)}
    try:
        previous = store.promote(root, name, version)
    except store.NewerIsCurrent as newer:
        return {"version": version, "current": False, "previous": newer.current, "reason": newer.reason}
    return {"version": version, "current": True, "previous": previous}


def _passed(manifest: dict[str, Any]) -> bool:
    return (manifest.get("gate") or {}).get("passed") is True


def rollback(root: Any, name: str, to: str | None = None) -> str:
    """Make an earlier release current again: the one explicit way to move CURRENT backwards (an ordinary
    promotion refuses to, see :func:`valuegate.storage.releases.promote`). Only a complete release whose
    gate passed can become current.

    Args:
        root, name: workspace root (directory, s3:// URI or Store) and release name.
        to: the version to make current; None: the newest passed release older than the current one.

    Returns:
        the version now current.

    Raises:
        ValuegateError: no release of ``name``; ``to`` missing, incomplete or failed its gate; no current
            release (give ``to``); or no passed release before the current one.
    """
    if to is not None:
        store.promote(root, name, to, backwards=True)
        return store.format_version(store.parse_version(to))
    releases = store.list_releases(root, name)
    if not releases:
        raise ValuegateError(f"no release named {name!r} (names: {', '.join(store.list_release_names(root))})")
    current = store.read_current(root, name)
    if current is None:
        raise ValuegateError(f"no release of {name!r} is current; name the one to promote (--to vNNNN)")
    before = [r["version"] for r in releases
              if _passed(r) and store.parse_version(r["version"]) < store.parse_version(current)]
    if not before:
        raise ValuegateError(f"no release of {name!r} before {current} passed its gate; nothing to roll back to")
    store.promote(root, name, before[-1], backwards=True)
    return before[-1]


def policy_cutoff(manifest: dict[str, Any], kept_values: pl.Series) -> float | None:
    """The cut of the release's selection policy on the score it reads.

    ``drop_negative`` → 0; ``threshold`` → its ``threshold``; ``top_fraction`` → the smallest kept value
    (the cut it resolved to); ``suspect`` → its ``suspect_threshold`` (the largest suspect score kept);
    ``keep_all`` or an unknown policy → None.
    """
    policy = manifest.get("policy") or {}
    kind = policy.get("policy")
    if kind == "suspect":
        return float(policy.get("suspect_threshold", 2.0))
    if kind == "drop_negative":
        return 0.0
    if kind == "threshold":
        return float(policy.get("threshold", 0.0))
    if kind == "top_fraction" and kept_values.len():
        return float(kept_values.min())
    return None


def _moved(kept_here: pl.DataFrame, kept_there: pl.DataFrame, scores_there: pl.DataFrame | None,
           valset_changed: bool, here_is_new: bool, measure: str = "value") -> pl.DataFrame:
    """Ids kept on one side only, with ``old_value``, ``new_value`` (of ``measure``) and ``reason``.

    Args:
        kept_here: ``id`` and ``measure`` of the side that keeps the ids.
        kept_there: ``id`` of the other side's kept rows.
        scores_there: ``id`` and ``measure`` of everything the other side scored (None: unknown; without
            the ``measure`` column: scored, score unknown).
        valset_changed: whether the two manifests pinned different validation sets.
        here_is_new: True for entered ids (``kept_here`` is release b), False for left ids.
        measure: the score the policies read, ``value`` or ``suspect``.
    """
    def score(frame: pl.DataFrame) -> pl.Expr:
        return (pl.col(measure) if measure in frame.columns else pl.lit(None)).cast(pl.Float64)

    moved = kept_here.select("id", score(kept_here).alias("value")).join(
        kept_there.select("id"), on="id", how="anti")
    if scores_there is None:
        moved = moved.with_columns(other=pl.lit(None, dtype=pl.Float64), scored=pl.lit(None, dtype=pl.Boolean))
    else:
        other = scores_there.select("id", score(scores_there).alias("other"), pl.lit(True).alias("scored"))
        moved = moved.join(other, on="id", how="left").with_columns(pl.col("scored").fill_null(False))
    reason = (pl.when(pl.col("scored").is_null()).then(pl.lit("unknown"))
              .when(~pl.col("scored")).then(pl.lit("new data"))
              .when(pl.lit(valset_changed)).then(pl.lit("new validation version"))
              .otherwise(pl.lit(f"{measure} change")))
    old, new = ("other", "value") if here_is_new else ("value", "other")
    return moved.select("id", pl.col(old).alias("old_value"), pl.col(new).alias("new_value"),
                        reason.alias("reason"))


def _summarise(moved: pl.DataFrame, examples: int) -> dict[str, Any]:
    out: dict[str, Any] = {"count": moved.height, "reasons": {}}
    for reason in REASONS:
        part = moved.filter(pl.col("reason") == reason)
        if part.height == 0:
            continue
        if reason in ("value change", "suspect change", "new validation version"):
            part = part.sort((pl.col("new_value") - pl.col("old_value")).abs(), "id",
                             descending=[True, False], nulls_last=True)
        else:
            part = part.sort("id")
        out["reasons"][reason] = {"count": part.height,
                                  "examples": part.head(examples).drop("reason").to_dicts()}
    return out


def diff_releases(root: Any, name: str, a: str, b: str, examples: int = 5) -> dict[str, Any]:
    """What changed between releases ``a`` and ``b`` of ``name``: ids that entered and left, with reasons.

    Args:
        root, name: workspace root (directory, s3:// URI or Store) and release name.
        a, b: versions (``a`` is the "before"; either order works).
        examples: how many ids to show per reason (largest value moves first for value changes, by id
            otherwise).

    Returns:
        ``{"name", "a", "b", "valset": {"a", "b"}, "model_fp": {"a", "b"}, "measure", "cutoff": {"a", "b"},
        "rows": {"a", "b"}, "entered": S, "left": S}`` where ``S = {"count": int, "reasons": {reason:
        {"count": int, "examples": [{"id", "old_value", "new_value"}]}}}`` and reason is one of
        :data:`REASONS` (see the module docstring). ``measure`` is the score the policies read
        (``suspect`` when both releases select by it, else ``value``); ``old_value`` is that score in ``a``
        (None when ``a`` did not score the id), ``new_value`` in ``b``.

    Raises:
        ValuegateError: either release missing or incomplete.
    """
    mb = store.read_manifest(root, name, b)
    measure = _measure(store.read_manifest(root, name, a), mb)
    sb = (store.read_release_scores(root, name, mb["version"])
          if store.release_scores_exist(root, name, mb["version"]) else None)
    db = _kept_measures(root, name, mb["version"], measure, sb)
    return diff_candidate(root, name, a, mb, db, sb, examples)


def _kept_measures(root: Any, name: str, version: str, measure: str, scores: pl.DataFrame | None) -> pl.DataFrame:
    """``id``, ``value`` and ``measure`` of a complete release's kept rows: the suspect score from its
    ``scores.parquet`` (a release's ``data.parquet`` holds the training columns only), or from
    ``data.parquet`` for a release written when it carried the score columns."""
    data = store.read_release_data(root, name, version, columns=["id", "value"])
    if measure == "value":
        return data
    if scores is not None and measure in scores.columns:
        return data.join(scores.select("id", measure), on="id", how="left")
    return store.read_release_data(root, name, version, columns=["id", "value", measure])


def _measure(ma: dict[str, Any], mb: dict[str, Any]) -> str:
    return "suspect" if all((m.get("policy") or {}).get("policy") == "suspect" for m in (ma, mb)) else "value"


def diff_candidate(root: Any, name: str, a: str, manifest: dict[str, Any], data: pl.DataFrame,
                   scores: pl.DataFrame | None, examples: int = 5) -> dict[str, Any]:
    """:func:`diff_releases` from the complete release ``a`` to a release given in memory, one not yet
    complete (the report of a release is rendered before its manifest is written).

    Args:
        manifest: the candidate's manifest or completion record (``version``, ``valset``, ``model_fp``,
            ``policy``).
        data: its kept rows, ``(n_kept, ≥2)``: ``id``, ``value`` (and ``suspect`` when the policy reads it).
        scores: every sample its run scored, ``id``, ``value`` (``suspect``); None: unknown.

    Returns:
        as :func:`diff_releases`, with ``b`` the candidate's version.
    """
    ma, mb = store.read_manifest(root, name, a), manifest
    va, vb = ma["version"], mb["version"]
    measure = _measure(ma, mb)
    sa = store.read_release_scores(root, name, va) if store.release_scores_exist(root, name, va) else None
    da = _kept_measures(root, name, va, measure, sa)
    db = data.select(list(dict.fromkeys(["id", "value", *([measure] if measure in data.columns else [])])))
    sb = scores
    valset_changed = ma.get("valset") != mb.get("valset")
    entered = _moved(db, da, sa, valset_changed, here_is_new=True, measure=measure)
    left = _moved(da, db, sb, valset_changed, here_is_new=False, measure=measure)
    return {
        "name": name,
        "a": va,
        "b": vb,
        "valset": {"a": ma.get("valset"), "b": mb.get("valset")},
        "model_fp": {"a": ma.get("model_fp"), "b": mb.get("model_fp")},
        "measure": measure,
        "cutoff": {"a": policy_cutoff(ma, da["value"]), "b": policy_cutoff(mb, db["value"])},
        "rows": {"a": da.height, "b": db.height},
        "entered": _summarise(entered, examples),
        "left": _summarise(left, examples),
    }


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_diff(diff: dict[str, Any]) -> str:
    """Human-readable text of a :func:`diff_releases` result, for the CLI (several lines, no trailing
    newline)."""
    a, b = diff["a"], diff["b"]
    lines = [f"release {diff['name']}: {a} → {b}   rows {diff['rows']['a']} → {diff['rows']['b']}"]
    for key, label in (("valset", "validation set"), ("model_fp", "model")):
        old, new = diff[key]["a"], diff[key]["b"]
        lines.append(f"  {label}: {old}" if old == new else f"  {label}: {old} → {new}")
    cut, measure = diff["cutoff"], diff.get("measure", "value")
    lines.append(f"  cut-off ({measure}): {_num(cut['a'])}" if cut["a"] == cut["b"]
                 else f"  cut-off ({measure}): {_num(cut['a'])} → {_num(cut['b'])}")
    for side in ("entered", "left"):
        part = diff[side]
        lines.append(f"{side}: {part['count']}")
        for reason, info in part["reasons"].items():
            lines.append(f"  {reason}: {info['count']}")
            for ex in info["examples"]:
                lines.append(f"    {ex['id'][:16]}  {_num(ex['old_value'])} → {_num(ex['new_value'])}")
    return "\n".join(lines)


def release_summary(manifest: dict[str, Any]) -> str:
    """One line per release for ``release list``: current mark, version, creation time, gate verdict,
    kept/scored rows, validation set, model fingerprint (12 chars) and run id."""
    gate = manifest.get("gate") or {}
    n_fail = len(gate.get("failures") or [])
    verdict = "passed" if _passed(manifest) else f"FAILED ({n_fail} check{'s' if n_fail != 1 else ''})"
    counts = manifest.get("counts") or {}
    kept = manifest.get("data_rows", counts.get("released"))
    scored = counts.get("scored")
    rows = f"kept {kept}" + (f"/{scored}" if scored is not None else "")
    mark = "*" if manifest.get("current") else " "
    return (f"{mark} {manifest.get('version')}  {manifest.get('created', '?')}  {verdict:<18} {rows:<14} "
            f"valset {manifest.get('valset')}  model {str(manifest.get('model_fp'))[:12]}  "
            f"run {manifest.get('run_id')}")


# --------------------------------------------------------------------------------------------------
# the ``release`` step of the refresh DAG
# --------------------------------------------------------------------------------------------------


def is_object_store(settings: Settings) -> bool:
    """Whether the workspace is on an object store (not a local directory)."""
    return "://" in settings.workspace and not settings.workspace.startswith("file://")


def staging_dir(settings: Settings, version: str, what: str) -> str:
    """A local folder for a file rendered before it is copied into the release (``what``: ``gate``,
    ``card``, ``report``): beside the release on a local workspace, a local temporary folder for an
    object-store one. It is written into and removed, so no part of it under the workspace may be a
    symbolic link (a ValuegateError names the link)."""
    if is_object_store(settings):
        return str(Path(tempfile.gettempdir()) / f"valuegate-{settings.release.name}-{version}-{what}-"
                   f"{uuid.uuid4().hex[:8]}")
    return str(open_root(settings.workspace).write_path(f"releases/{settings.release.name}/.{version}-{what}"))


@dataclass(frozen=True)
class ReleaseResult:
    """What :func:`run` did.

    Attributes:
        record (dict[str, Any]): the completion record (the manifest to be), or the manifest of a version
            already complete (a resumed one).
        staged (bool): whether this call staged the files (False: the version was already complete).
    """

    record: dict[str, Any]
    staged: bool


def run(settings: Settings, selected: pl.DataFrame, manifest_parts: dict[str, Any], gate_result: dict[str, Any],
        version: str, docs_dir: str) -> ReleaseResult:
    """Stage the release files (data: the training columns; scores: every score column; the gate's Data
    Docs from ``docs_dir``; the dataset card README.md); the report step completes the release (the report,
    then the manifest).

    Args:
        selected: the scored samples with the selection's ``keep`` and ``reason``.
        manifest_parts: the :func:`build_manifest` arguments the flow gathered, plus ``timings`` (seconds
            per step so far) and ``cached_steps``, stored beside them in the manifest.
        gate_result: the gate's verdict (``passed``, ``failures``, ``docs_index``).

    Idempotent: staging an incomplete version writes every file again whatever a crash left; a version
    already complete (a resumed one) is returned as it is.
    """
    root, name = open_store(settings.workspace), settings.release.name
    staged = not store.release_exists(root, name, version)
    if not staged:
        record = store.read_manifest(root, name, version)
    else:
        data, scores = release_frames(selected)  # training columns | every score column (issue 16)
        beside = {k: manifest_parts[k] for k in ("timings", "cached_steps") if k in manifest_parts}
        fields = {k: v for k, v in manifest_parts.items() if k != "counts" and k not in beside}
        manifest = build_manifest(name=name, version=version, gate=gate_result,
                                  counts={**manifest_parts["counts"], "released": data.height}, **fields)
        extra = {"gate": Path(docs_dir)} if Path(docs_dir).is_dir() else {}
        card_dir = Path(staging_dir(settings, version, "card"))
        extra |= card_extra(card_dir, manifest, data, dropped_reason_counts(selected, settings.select))  # README.md
        record = store.stage_release(root, name, version, data, {**manifest, **beside}, extra, scores=scores)
        shutil.rmtree(card_dir, ignore_errors=True)
    shutil.rmtree(docs_dir, ignore_errors=True)  # copied into the release as gate/
    return ReleaseResult(record, staged)
