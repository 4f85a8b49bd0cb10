"""The release report: one self-contained HTML file (inline SVG plots, no external assets)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

KEEP_COLOUR, DROP_COLOUR = "#2b8a3e", "#c92a2a"


def _histogram_svg(kept: np.ndarray, dropped: np.ndarray, title: str, width: int = 560, height: int = 180,
                   bins: int = 40, span: tuple[float, float] | None = None, marker: float | None = None) -> str:
    """A stacked histogram of kept and dropped values as an inline SVG string (``span``: the value axis,
    shared by every plot of a report so groups compare at a glance)."""
    both = np.concatenate([kept, dropped]) if kept.size + dropped.size else np.zeros(1)
    lo, hi = span if span is not None else (float(np.min(both)), float(np.max(both)))
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    hk, _ = np.histogram(kept, edges)
    hd, _ = np.histogram(dropped, edges)
    top = max(1, int((hk + hd).max()))
    pad, w, h = 30, width - 40, height - 50
    bw = w / bins
    bars = []
    for i in range(bins):
        x = pad + i * bw
        yk = h * hk[i] / top
        yd = h * hd[i] / top
        if hd[i]:
            bars.append(f'<rect x="{x:.1f}" y="{20 + h - yd:.1f}" width="{bw - 1:.1f}" height="{yd:.1f}" '
                        f'fill="{DROP_COLOUR}"><title>{hd[i]} dropped</title></rect>')
        if hk[i]:
            bars.append(f'<rect x="{x:.1f}" y="{20 + h - yd - yk:.1f}" width="{bw - 1:.1f}" height="{yk:.1f}" '
                        f'fill="{KEEP_COLOUR}"><title>{hk[i]} kept</title></rect>')
    zero = ""
    at = marker if marker is not None else 0.0
    if lo < at < hi:
        zx = pad + w * (at - lo) / (hi - lo)
        zero = f'<line x1="{zx:.1f}" y1="18" x2="{zx:.1f}" y2="{20 + h}" stroke="#555" stroke-dasharray="3,3"/>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
            f'<text x="{pad}" y="13" font-size="12">{html.escape(title)}</text>{"".join(bars)}{zero}'
            f'<line x1="{pad}" y1="{20 + h}" x2="{pad + w}" y2="{20 + h}" stroke="#333"/>'
            f'<text x="{pad}" y="{height - 12}" font-size="11">{lo:.3g}</text>'
            f'<text x="{pad + w}" y="{height - 12}" font-size="11" text-anchor="end">{hi:.3g}</text></svg>')


def _sample_text(row: dict[str, Any], limit: int = 160) -> str:
    if row.get("text"):
        body = row["text"]
    elif row.get("messages"):
        body = row["messages"]
    else:
        body = f"{row.get('prompt') or ''} ⟶ {row.get('response') or ''}"
    body = body if len(body) <= limit else body[:limit] + "…"
    return html.escape(body)


def _thumbs_html(row: dict[str, Any], thumbs: dict[str, str]) -> str:
    """The row's images as small inline thumbnails (``images``: content hashes), or ""."""
    cells = []
    for h in row.get("images") or []:
        uri = thumbs.get(h)
        cells.append(f"<img class='thumb' src='{uri}' alt='image {html.escape(h[:12])}' title='sha256 {html.escape(h)}'>"
                     if uri else f"<span class='nothumb' title='sha256 {html.escape(h)}'>[image {html.escape(h[:8])}]</span>")
    return "<div class='thumbs'>" + "".join(cells) + "</div>" if cells else ""


def load_thumbnails(workspace: str | None, hashes: list[str], px: int = 96) -> dict[str, str]:
    """sha256 → thumbnail ``data:`` URI for the images the workspace holds ({} without a workspace)."""
    if not workspace or not hashes:
        return {}
    from valuegate.storage.lance import Workspace
    from valuegate.tasks.images import thumbnail_data_uri
    from valuegate.tasks.images_store import read_image_data

    data = read_image_data(Workspace.from_env(workspace), hashes)
    return {h: thumbnail_data_uri(b, px) for h, b in data.items()}


def _table(rows: list[dict[str, Any]], valid_text: dict[str, str], thumbs: dict[str, str] | None = None) -> str:
    has_suspect = any(r.get("suspect") is not None for r in rows)
    head = "<th>value</th>" + ("<th>suspect</th>" if has_suspect else "")
    out = [f"<table><tr>{head}<th>kept</th><th>sample</th><th>nearest validation samples</th></tr>"]
    for r in rows:
        near = "<br>".join(valid_text.get(i, i[:12]) for i in (r.get("nearest_ids") or [])[:2])
        kept = "✓" if r["keep"] else f"✗ {html.escape(r.get('reason') or '')}"
        sus = ""
        if has_suspect:
            x = r.get("suspect")
            why = html.escape(r.get("suspect_reason") or "")
            sus = f"<td title='{why}'>{x:.3g}<br><small>{why}</small></td>" if x is not None else "<td></td>"
        pics = _thumbs_html(r, thumbs) if thumbs is not None else ""
        out.append(f"<tr><td>{r['value']:.4g}</td>{sus}<td>{kept}</td><td>{pics}{_sample_text(r)}</td>"
                   f"<td>{near}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _tokens_html(tc: Any) -> str:
    """A sample's tokens, counted ones shaded by the part of the value they carry (green +, red −)."""
    vals = [abs(c) for c in tc.contributions if c is not None]
    top = max(vals) if vals else 1.0
    top = top or 1.0
    spans = []
    for text, c in zip(tc.tokens, tc.contributions, strict=True):
        t = html.escape(text).replace("\n", "↵<br>")
        if c is None:
            spans.append(f"<span class='ctx'>{t}</span>")
        else:
            a = min(1.0, abs(c) / top)
            rgb = "43,138,62" if c >= 0 else "201,42,42"
            spans.append(f"<span class='tok' style='background:rgba({rgb},{0.12 + 0.78 * a:.2f})' "
                         f"title='{c:+.4g}'>{t}</span>")
    return "<div class='tokens'>" + "".join(spans) + "</div>"


def render_report(selected: pl.DataFrame, manifest: dict[str, Any], valid_rows: list[dict[str, Any]],
                  diff_text: str | None = None, group_by: str | None = None,
                  explained: list[tuple[str, dict[str, Any], Any]] | None = None,
                  suspect_threshold: float | None = None, thumbnails: dict[str, str] | None = None) -> str:
    """The report of one release as an HTML string.

    Args:
        selected: every scored sample with ``id``, ``value``, ``keep``, ``reason`` and content columns.
        manifest: the release manifest (counts, gate, valset, policy).
        valid_rows: the validation samples (``id`` and content) to show beside nearest ids.
        diff_text: what changed since the previous release, as text.
        group_by: the column whose groups get their own plot and retention row.
        explained: ``(label, row, TokenContributions)`` of the few samples whose tokens are highlighted.
        suspect_threshold: drawn on the suspect histogram when the policy uses it.
        thumbnails: sha256 → image URI for samples with an ``images`` column (content hashes); by default
            loaded from the workspace named in ``manifest["settings"]`` for the samples the report shows.
    """
    values = selected["value"].to_numpy()
    keep = selected["keep"].to_numpy()
    thumbs = thumbnails
    if "images" in selected.columns and thumbs is None:
        thumbs = _shown_thumbnails(selected, manifest)
    vtext = {r["id"]: _sample_text(r, 100) for r in valid_rows}
    gate = manifest.get("gate", {})
    verdict = "passed" if gate.get("passed") else "FAILED"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>valuegate release "
        f"{html.escape(str(manifest.get('name')))}/{html.escape(str(manifest.get('version')))}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
        "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}"
        ".ok{color:#2b8a3e}.bad{color:#c92a2a}.tokens{font-family:monospace;font-size:13px;line-height:1.9;"
        "border:1px solid #ddd;padding:6px;margin:.3em 0 1em}.ctx{color:#999}.tok{border-radius:2px}"
        ".thumb{max-height:96px;max-width:96px;margin:0 4px 4px 0;border:1px solid #ccc}.nothumb{color:#999}"
        "</style></head><body>",
        f"<h1>Release {html.escape(str(manifest.get('name')))} / {html.escape(str(manifest.get('version')))}</h1>",
        f"<p>Validation set <b>{html.escape(str(manifest.get('valset')))}</b>, model fingerprint "
        f"<code>{html.escape(str(manifest.get('model_fp', ''))[:16])}</code>, policy "
        f"<code>{html.escape(str(manifest.get('policy', {}).get('policy')))}</code> on "
        f"<code>{html.escape(str(manifest.get('policy', {}).get('aggregate')))}</code>. Gate: "
        f"<b class='{'ok' if gate.get('passed') else 'bad'}'>{verdict}</b></p>",
    ]
    if gate.get("failures"):
        parts.append("<ul>" + "".join(f"<li class='bad'>{html.escape(f)}</li>" for f in gate["failures"]) + "</ul>")
    counts = manifest.get("counts", {})
    parts.append("<h2>Counts</h2><table>" + "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in counts.items()) + "</table>")
    if "corruption" in selected.columns:  # the demo knows which rows it corrupted: say how many were dropped
        bad = (selected["corruption"].fill_null("") != "").to_numpy()
        line = (f"Known corrupted samples: {int(bad.sum())}; dropped by this release: "
                f"{int((bad & ~keep).sum())}; clean samples dropped: {int((~bad & ~keep).sum())}.")
        for col, sign, what in (("suspect", 1.0, "suspect score"), ("value", -1.0, "value (low = corrupted)")):
            if col in selected.columns and selected[col].null_count() == 0 and 0 < bad.sum() < bad.size:
                line += f" Detection AUC of the {what}: {detection_auc(sign * selected[col].to_numpy(), bad):.3f}."
        parts.append(f"<p>{line}</p>")
    parts.append("<h2>Value distribution</h2>")
    span = (float(values.min()), float(values.max())) if values.size else None
    parts.append(_histogram_svg(values[keep], values[~keep], "all samples (green kept, red dropped)", span=span))
    if group_by and group_by in selected.columns:
        rows = []
        for g in sorted(selected[group_by].cast(pl.String).fill_null("∅").unique().to_list()):
            m = (selected[group_by].cast(pl.String).fill_null("∅") == g).to_numpy()
            parts.append(_histogram_svg(values[m & keep], values[m & ~keep], f"{group_by} = {g}", height=140,
                                        span=span))
            rows.append(f"<tr><td>{html.escape(g)}</td><td>{int(m.sum())}</td><td>{int((m & keep).sum())}</td>"
                        f"<td>{(m & keep).sum() / max(1, m.sum()):.1%}</td></tr>")
        parts.append(f"<table><tr><th>{html.escape(group_by)}</th><th>scored</th><th>kept</th><th>retained</th>"
                     "</tr>" + "".join(rows) + "</table>")
    if "suspect" in selected.columns and selected["suspect"].null_count() < selected.height:
        sus = selected["suspect"].fill_null(np.nan).to_numpy().astype(np.float64)
        ok = np.isfinite(sus)
        parts.append("<h2>Suspect score</h2><p>How far each sample lies from what the validation set itself "
                     "looks like on the value signals (robust z units; higher = more suspect)"
                     + (f"; the policy drops samples above {suspect_threshold:g}" if suspect_threshold else "")
                     + ".</p>")
        parts.append(_histogram_svg(sus[ok & keep], sus[ok & ~keep], "suspect (green kept, red dropped)",
                                    marker=suspect_threshold))
        parts.append("<h2>Most suspect samples</h2>" + _table(
            selected.filter(pl.col("suspect").is_not_null()).sort("suspect", descending=True).head(10).to_dicts(),
            vtext, thumbs))
    ranked = selected.sort("value")
    parts.append("<h2>Lowest-valued samples</h2>" + _table(ranked.head(10).to_dicts(), vtext, thumbs))
    parts.append("<h2>Highest-valued samples</h2>" + _table(ranked.tail(10).reverse().to_dicts(), vtext, thumbs))
    if explained:
        parts.append("<h2>Which tokens carry the value</h2><p>Each counted token is shaded by the part of the "
                     "sample's mean value it carries (green raises it, red lowers it; hover for the number); grey "
                     "tokens are not counted.</p>")
        for label, row, tc in explained:
            parts.append(f"<h3>{html.escape(label)}: value {row['value']:.4g} (tokens sum to {tc.total:.4g})</h3>"
                         + _tokens_html(tc))
    parts.append("<h2>Since the previous release</h2><pre>"
                 + html.escape(diff_text or "no previous release") + "</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def _shown_thumbnails(selected: pl.DataFrame, manifest: dict[str, Any]) -> dict[str, str]:
    """Thumbnails of the images of the samples the report lists (lowest, highest, most suspect)."""
    ranked = selected.sort("value")
    shown = [ranked.head(10), ranked.tail(10)]
    if "suspect" in selected.columns:
        shown.append(selected.filter(pl.col("suspect").is_not_null()).sort("suspect", descending=True).head(10))
    hashes = sorted({h for f in shown for imgs in f["images"].to_list() for h in (imgs or [])})
    try:
        return load_thumbnails((manifest.get("settings") or {}).get("workspace"), hashes)
    except Exception:  # the report never fails for a picture: the rows say [image <hash>] instead
        return {}


def pick_explained(selected: pl.DataFrame, per_kind: int = 2) -> list[tuple[str, dict[str, Any]]]:
    """The samples whose tokens the report highlights: the lowest- and highest-valued and the most suspect
    (``per_kind`` each, no sample twice), as ``(label, row)``."""
    picks: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    orders = [("lowest value", selected.sort("value")), ("highest value", selected.sort("value", descending=True))]
    if "suspect" in selected.columns and selected["suspect"].null_count() < selected.height:
        orders.append(("most suspect", selected.filter(pl.col("suspect").is_not_null())
                       .sort("suspect", descending=True)))
    for label, frame in orders:
        for row in frame.head(per_kind + len(seen)).to_dicts():
            if row["id"] not in seen and sum(1 for lab, _ in picks if lab == label) < per_kind:
                seen.add(row["id"])
                picks.append((label, row))
    return picks


def detection_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``score`` (higher = positive) for the boolean ``positive`` labels; ties count half."""
    from scipy.stats import rankdata

    pos = np.asarray(positive, dtype=bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    r = rankdata(np.asarray(score, dtype=np.float64))
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def write_report(path: Path, content: str) -> Path:
    """Write the report atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)
    return path
