"""The refresh DAG: ingest → extract → score → select → gate → release. Thin: every task body is one call
of a pure function in ``valuegate.tasks``; retries only where a retry can help (I/O), never on the gate
or deterministic compute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from valuegate.errors import ValuegateError
from valuegate.settings import Settings, load_settings


def _workspace(settings: Settings):
    from valuegate.storage.lance import Workspace

    return Workspace.from_env(settings.workspace)


@task(name="ingest", retries=2, retry_delay_seconds=2)
def ingest_sources(settings: Settings) -> dict[str, int]:
    """Ingest every configured source into the dataset (unchanged files are no-ops)."""
    from valuegate.storage.samples import ensure_sample_tables
    from valuegate.tasks.ingest import ingest_file

    ws = _workspace(settings)
    ensure_sample_tables(ws)
    if not settings.data.sources:
        raise ValuegateError("no sources configured: set data.sources (a list of files) in the config")
    totals = {"rows": 0, "kept": 0, "new_samples": 0, "duplicates": 0, "quarantined": 0, "left": 0}
    log = get_run_logger()
    for src in settings.data.sources:
        rep = ingest_file(ws, settings.data.dataset, src, settings.ingest.max_chars)
        log.info(rep.line())
        for k in totals:
            totals[k] += getattr(rep, k)
    # the dataset as it stands (unchanged sources add nothing this run, but their rows still count)
    from valuegate.storage.samples import read_members, read_quarantine

    totals["dataset_rows"] = read_members(ws, settings.data.dataset, columns=["id"]).num_rows
    totals["dataset_quarantined"] = read_quarantine(ws, settings.data.dataset).num_rows
    return totals


@task(name="validation-set", retries=2, retry_delay_seconds=2)
def resolve_validation_set(settings: Settings) -> dict[str, Any]:
    """Register ``data.valset_file`` as the next version of ``data.valset`` (a no-op for identical content)
    and pin the version the run scores against."""
    from valuegate.storage.valsets import read_valset
    from valuegate.tasks.valsets import register_valset

    ws = _workspace(settings)
    name = settings.data.valset.split("@")[0]
    if settings.data.valset_file:
        rec, _ = register_valset(ws, name, settings.data.valset_file, settings.ingest.max_chars)
        ref = settings.data.valset if "@" in settings.data.valset else f"{name}@v{rec['version']}"
    else:
        ref = settings.data.valset
    rec, _ = read_valset(ws, ref)
    return {"valset": f"{rec['name']}@v{rec['version']}", "rows": rec["rows"]}


@task(name="extract+score")
def score(settings: Settings, valset: str) -> dict[str, Any]:
    """Extract what is missing for the fingerprint and score the dataset (deterministic: no retries)."""
    from valuegate.tasks.score import score_dataset

    ws = _workspace(settings)
    scoring = settings.model_copy(update={"score": settings.score.model_copy(
        update={"aggregate": settings.select.aggregate})})
    rep = score_dataset(ws, settings.data.dataset, valset, scoring, progress=False)
    get_run_logger().info(rep.line())
    return {"run_id": rep.run_id, "model_fp": rep.model_fp, "n_train": rep.n_train,
            "extracted": rep.extract_train.extracted, "timings": rep.timings}


@task(name="select")
def select(settings: Settings, run_id: str) -> Any:
    """Apply the selection policy to the scored samples."""
    from valuegate.tasks.score import read_score_run
    from valuegate.tasks.select import select_samples

    scored = read_score_run(_workspace(settings), run_id, settings.data.dataset)
    return select_samples(scored, settings.select)


@task(name="gate")
def gate(settings: Settings, selected: Any, counts: dict[str, int], valset: dict[str, Any],
         docs_dir: str) -> dict[str, Any]:
    """Great Expectations on the candidate release (never retried: a verdict is not a transient error)."""
    from valuegate.tasks.gate import GateInput, run_gate

    group = settings.select.group_by
    inp = GateInput(candidate=selected.filter(selected["keep"]), scored=selected, group_by=group,
                    ingested_rows=counts["dataset_rows"] + counts["dataset_quarantined"],
                    quarantined_rows=counts["dataset_quarantined"],
                    valset=valset["valset"], valset_rows=valset["rows"])
    res = run_gate(inp, settings.gate, Path(docs_dir))
    return {"passed": res.passed, "failures": res.failures, "docs_index": str(res.docs_index or "")}


@task(name="release", retries=2, retry_delay_seconds=2)
def write_release_task(settings: Settings, selected: Any, manifest_parts: dict[str, Any], gate_result: dict,
                       version: str, docs_dir: str) -> str:
    """Write the release files (data, every score, manifest, Data Docs); promotion is a separate step.

    Idempotent: a retry after the manifest landed finds the release complete and returns.
    """
    import shutil

    from valuegate.storage.releases import release_exists, write_release
    from valuegate.tasks.release import build_manifest

    root = Path(settings.workspace)
    if not release_exists(root, settings.release.name, version):
        data = selected.filter(selected["keep"]).drop("keep", "reason")
        manifest = build_manifest(name=settings.release.name, version=version, gate=gate_result,
                                  counts={**manifest_parts["counts"], "released": data.height},
                                  **{k: v for k, v in manifest_parts.items() if k != "counts"})
        extra = {"gate": Path(docs_dir)} if Path(docs_dir).is_dir() else None
        write_release(root, settings.release.name, version, data, manifest, extra,
                      scores=selected.select("id", "value"))
    shutil.rmtree(docs_dir, ignore_errors=True)  # copied into the release as gate/
    return version


@task(name="report")
def report(settings: Settings, selected: Any, version: str, previous: str | None) -> str:
    """Write report.html into the release folder (plots, top/bottom samples, change since the previous)."""
    from valuegate.storage.releases import read_manifest, release_dir
    from valuegate.storage.valsets import read_valset
    from valuegate.tasks.release import diff_releases, format_diff
    from valuegate.tasks.report import render_report, write_report

    root = Path(settings.workspace)
    name = settings.release.name
    manifest = read_manifest(root, name, version)
    _, vrows = read_valset(_workspace(settings), manifest["valset"])
    diff_text = format_diff(diff_releases(root, name, previous, version)) if previous else None
    html_text = render_report(selected, manifest, vrows.to_pylist(), diff_text, settings.select.group_by)
    return str(write_report(release_dir(root, name, version) / "report.html", html_text))


@task(name="promote", retries=2, retry_delay_seconds=2)
def promote_task(settings: Settings, version: str) -> None:
    """Move CURRENT to the release (only called after the gate passed)."""
    from valuegate.storage.releases import promote

    promote(Path(settings.workspace), settings.release.name, version)


@flow(name="refresh", log_prints=True)
def refresh(config: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """ingest → extract → score → select → gate → release, on the settings of ``config`` (+ overrides).

    Parameters are small references (a config path, a dict of overrides), never data.

    Returns:
        a summary: release version, whether it became current, counts, gate failures.

    Raises:
        ValuegateError: the gate failed (the release is written for inspection but never becomes current,
            and the previous release stays current).
    """
    from valuegate.storage.releases import allocate_version, read_current
    from valuegate.tasks.ingest import file_hash

    settings = load_settings(config, overrides)
    counts = ingest_sources(settings)
    valset = resolve_validation_set(settings)
    run = score(settings, valset["valset"])
    selected = select(settings, run["run_id"])
    version = allocate_version(Path(settings.workspace), settings.release.name)
    rdir = Path(settings.workspace) / "releases" / settings.release.name / version
    docs_dir = str(rdir.parent / f".{version}-gate")
    verdict = gate(settings, selected, counts, valset, docs_dir)
    parts = {
        "run_id": run["run_id"], "model_fp": run["model_fp"], "valset": valset["valset"],
        "inputs": [{"source": str(Path(s).resolve()), "sha256": file_hash(s)} for s in settings.data.sources],
        "policy": settings.select.model_dump(mode="json"), "thresholds": settings.gate.model_dump(mode="json"),
        "counts": {**counts, "scored": selected.height, "extracted": run["extracted"]},
        "settings": json.loads(settings.model_dump_json()),
    }
    previous = read_current(Path(settings.workspace), settings.release.name)
    write_release_task(settings, selected, parts, verdict, version, docs_dir)
    report_path = report(settings, selected, version, previous)
    _artifacts(selected, parts["counts"], version, verdict, report_path)
    if not verdict["passed"]:
        raise ValuegateError(f"gate failed for release {settings.release.name}/{version} "
                             f"(current stays {previous or 'none'}): " + "; ".join(verdict["failures"]))
    promote_task(settings, version)
    return {"version": version, "current": True, "previous": previous, "counts": parts["counts"],
            "report": report_path, "model_fp": run["model_fp"],
            "kept": int(selected["keep"].sum()), "valset": valset["valset"], "run_id": run["run_id"]}


def _artifacts(selected: Any, counts: dict[str, int], version: str, verdict: dict, report_path: str) -> None:
    """Prefect artifacts: lowest/highest valued samples, step counts, the gate verdict."""
    cols = [c for c in ("id", "value", "keep", "reason", "prompt", "response", "text") if c in selected.columns]
    ranked = selected.sort("value").select(cols)
    for key, part in (("lowest-valued", ranked.head(10)), ("highest-valued", ranked.tail(10).reverse())):
        rows = [{k: (str(v)[:120] if isinstance(v, str) else v) for k, v in r.items()} for r in part.to_dicts()]
        create_table_artifact(key=key, table=rows, description=f"{key} samples of release {version}")
    lines = [f"# release {version}", "", "| step | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", f"gate: {'passed' if verdict['passed'] else 'FAILED'}"]
    lines += [f"- {f}" for f in verdict["failures"]]
    lines += ["", f"Report: [{report_path}](file://{report_path})"]
    if verdict.get("docs_index"):
        lines += ["", f"Data Docs: {verdict['docs_index']}"]
    create_markdown_artifact(key="release-summary", markdown="\n".join(lines))


__all__ = ["refresh"]
