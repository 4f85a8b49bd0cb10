"""What ``valuegate run`` prints at its end: a few lines for people, or (``--json``) one object for machines.

Both are made from the summary :func:`valuegate.flows.refresh.refresh` returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from valuegate.tasks.ingest import INGEST_COUNTS

TOP_REASONS = 3


def report_url(report: str) -> str:
    """A local report path as a ``file://`` URL (an object-store URI stays as it is)."""
    return report if "://" in report else Path(report).resolve().as_uri()


def summary_json(summary: dict[str, Any], release: str) -> dict[str, Any]:
    """The run's summary with unambiguous counts: ``kept`` / ``dropped`` / ``dropped_reasons`` are the
    selection's, ``counts.released`` the rows the release holds, and the ingest's own counts (``rows``,
    ``kept``, ...) sit under ``counts.ingested``.

    Args:
        summary: the dict :func:`~valuegate.flows.refresh.refresh` returns.
        release: the release name.
    """
    counts = dict(summary["counts"])
    ingested = {k: counts.pop(k) for k in INGEST_COUNTS if k in counts}
    kept = summary["kept"]
    head = {"release": release, "version": summary["version"], "current": summary["current"],
            "previous": summary["previous"], **({"reason": summary["reason"]} if "reason" in summary else {}),
            "gate": summary.get("gate"), "kept": kept, "dropped": counts["scored"] - kept,
            "dropped_reasons": summary.get("dropped_reasons", {}), "report": summary["report"],
            "counts": {"ingested": ingested, **counts, "released": kept}}
    return {**head, **{k: v for k, v in summary.items() if k not in head}}


def summary_lines(summary: dict[str, Any], release: str, max_length: int) -> list[str]:
    """A few lines for people: the release and whether it is current, kept / dropped with the top reasons,
    the gate, truncated / unscored / quarantined counts when there are any, whether IFD's pass ran, and the
    report's URL.

    Args:
        summary: the dict :func:`~valuegate.flows.refresh.refresh` returns.
        release: the release name.
        max_length: ``extract.max_length`` of the run (named on the truncated line).
    """
    c = summary["counts"]
    where = f"release {release}/{summary['version']}"
    if summary.get("unchanged"):
        return [f"nothing changed since {summary['version']}: {where} stays current (same data, validation set, "
                "model and settings; no new release written)", f"report: {report_url(summary['report'])}"]
    if summary["current"]:
        lines = [f"{where} is current (previous: {summary['previous'] or 'none'})"]
    else:
        lines = [f"{where} is not current ({summary.get('reason') or 'not promoted'})"]
    scored, kept = c["scored"], summary["kept"]
    reasons = list(summary.get("dropped_reasons", {}).items())
    why = "; ".join(f"{n} × {r}" for r, n in reasons[:TOP_REASONS])
    rest = sum(n for _, n in reasons[TOP_REASONS:])
    why += f"; {rest} for {len(reasons) - TOP_REASONS} other reasons" if rest else ""
    dropped = scored - kept
    lines.append(f"kept {kept} of {scored} scored, dropped {dropped}" + (f": {why}" if dropped else ""))
    gate = summary.get("gate") or {}
    lines.append("gate: passed" if gate.get("passed", True) else "gate: FAILED: " + "; ".join(gate["failures"]))
    if c.get("truncated"):
        lines.append(f"truncated: {c['truncated']} of {scored} samples valued on their first {max_length} "
                     "tokens only (extract.max_length)")
    if c.get("unscored"):
        lines.append(f"unscored: {c['unscored']} samples not valued (the score step's log names them and why)")
    if c.get("quarantined"):
        lines.append(f"quarantined: {c['quarantined']} of {c['rows']} rows read this run were refused at ingest")
    unc = summary.get("unconditional")
    if unc is not None:
        lines.append(f"IFD pass (each response alone): {'run' if unc['ran'] else 'skipped, ifd is null'} "
                     f"(extract.unconditional = {unc['setting']})")
    lines.append(f"report: {report_url(summary['report'])}")
    return lines
