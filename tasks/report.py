"""The release report: one self-contained HTML file (inline SVG plots, no external assets)."""

from __future__ import annotations

import html
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from valuegate.engine.detection import bad_kinds, detection_rows, flag_sides
from valuegate.engine.explain import TokenContributions, mean_rows, token_contributions
from valuegate.engine.images import thumbnail_data_uri
from valuegate.engine.model import (
    LoadedModel,
    load_model,
    load_tokenizer,
)
from valuegate.errors import ValuegateError
from valuegate.inputs.identity import sample_from_record
from valuegate.settings import Settings
from valuegate.storage import features as fstore
from valuegate.storage import releases as rstore
from valuegate.storage.images import attach_image_data, read_image_data
from valuegate.storage.schemas import SIGNAL_COLUMNS
from valuegate.storage.store import Store, open_store
from valuegate.storage.valsets import read_valset
from valuegate.tasks.extract import feature_fingerprint
from valuegate.tasks.release import diff_candidate, format_diff, policy_cutoff, staging_dir
from valuegate.tasks.score import _feature_matrix, _hidden
from valuegate.tasks.select import reason_kinds
from valuegate.tasks.validation_set import valset_samples

# only the steps after scoring run this module: it stays out of the cached steps' code fingerprint
# (valuegate.flows.after_scoring)
AFTER_SCORING = True

KEEP_COLOUR, DROP_COLOUR = "#2b8a3e", "#c92a2a"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values within [lo, hi]."""
    step = 10 ** np.floor(np.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= n:
            step *= m
            break
    return [float(t) for t in np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step)]


def _histogram_svg(kept: np.ndarray, dropped: np.ndarray, title: str, width: int = 560, height: int = 200,
                   bins: int = 40, span: tuple[float, float] | None = None, marker: float | None = None,
                   x_label: str = "value", marker_label: str | None = None) -> str:
    """A stacked histogram of kept and dropped values as an inline SVG string: labelled axes (``x_label``
    with its unit; samples per bin on the y axis), round ticks, and ``marker`` (the policy's cut-off)
    drawn as a dashed line labelled ``marker_label``. ``span``: the value axis, shared by every plot of a
    report so groups compare at a glance."""
    both = np.concatenate([kept, dropped]) if kept.size + dropped.size else np.zeros(1)
    lo, hi = span if span is not None else (float(np.min(both)), float(np.max(both)))
    if marker is not None and np.isfinite(marker):
        lo, hi = min(lo, marker), max(hi, marker)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    hk, _ = np.histogram(kept, edges)
    hd, _ = np.histogram(dropped, edges)
    top = max(1, int((hk + hd).max()))
    left, right, y0 = 52, 16, 22  # plot area: x in [left, width - right], y in [y0, y0 + h]
    w, h = width - left - right, height - y0 - 46
    bw = w / bins

    def x_of(v: float) -> float:
        return left + w * (v - lo) / (hi - lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'class="plot"><title>{html.escape(title)}</title>'
           f'<text x="{left}" y="14" font-size="12" font-weight="bold">{html.escape(title)}</text>']
    for i in range(bins):
        x = left + i * bw
        yk, yd = h * hk[i] / top, h * hd[i] / top
        if hd[i]:
            out.append(f'<rect x="{x:.1f}" y="{y0 + h - yd:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{yd:.1f}" '
                       f'fill="{DROP_COLOUR}"><title>{hd[i]} dropped in [{edges[i]:.3g}, {edges[i + 1]:.3g})</title></rect>')
        if hk[i]:
            out.append(f'<rect x="{x:.1f}" y="{y0 + h - yd - yk:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                       f'height="{yk:.1f}" fill="{KEEP_COLOUR}"><title>{hk[i]} kept in [{edges[i]:.3g}, '
                       f'{edges[i + 1]:.3g})</title></rect>')
    out.append(f'<line x1="{left}" y1="{y0 + h}" x2="{left + w}" y2="{y0 + h}" stroke="#333"/>'
               f'<line x1="{left}" y1="{y0}" x2="{left}" y2="{y0 + h}" stroke="#333"/>')
    for t in _ticks(lo, hi):
        out.append(f'<line x1="{x_of(t):.1f}" y1="{y0 + h}" x2="{x_of(t):.1f}" y2="{y0 + h + 4}" stroke="#333"/>'
                   f'<text x="{x_of(t):.1f}" y="{y0 + h + 15}" font-size="10" text-anchor="middle">{t:.3g}</text>')
    for t in (0, top // 2, top) if top > 1 else (0, top):
        y = y0 + h - h * t / top
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>'
                   f'<text x="{left - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{t}</text>')
    out.append(f'<text class="axis-label" x="{left + w / 2:.1f}" y="{height - 6}" font-size="11" '
               f'text-anchor="middle">{html.escape(x_label)}</text>'
               f'<text class="axis-label" x="12" y="{y0 + h / 2:.1f}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {y0 + h / 2:.1f})">samples per bin</text>')
    if marker is not None and lo <= marker <= hi:
        mx = x_of(marker)
        label = marker_label or f"cut-off {marker:g}"
        anchor = "end" if mx > left + w / 2 else "start"
        dx = -3 if anchor == "end" else 3
        out.append(f'<line class="threshold" x1="{mx:.1f}" y1="{y0 - 4}" x2="{mx:.1f}" y2="{y0 + h}" stroke="#111" '
                   f'stroke-width="1.5" stroke-dasharray="4,3"/><text x="{mx + dx:.1f}" y="{y0 + 6}" '
                   f'font-size="10" text-anchor="{anchor}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


VALUE_AXIS = "value (For-Value score, unitless; higher = more useful to the validation set)"
SUSPECT_AXIS = "suspect score (calibrated robust z units)"


def _reason_kinds(selected: pl.DataFrame, policy: dict[str, Any]) -> list[str]:
    """The reason of every row without the sample's own numbers ("" when kept), so reasons can be grouped
    (:func:`valuegate.tasks.select.reason_kinds`, under the manifest's ``policy``)."""
    return reason_kinds(selected, policy)


def _top_reasons(kinds: list[str], mask: np.ndarray, n: int = 3) -> str:
    counted = Counter(k for k, m in zip(kinds, mask, strict=True) if m and k)
    return "; ".join(f"{html.escape(k)} ({c})" for k, c in counted.most_common(n)) or "–"


def _groups_html(selected: pl.DataFrame, group_by: str, kinds: list[str], values: np.ndarray, keep: np.ndarray,
                 span: tuple[float, float] | None, cut: float | None, cut_label: str | None) -> str:
    """One row per group (scored, kept, dropped, retained, why dropped) and one histogram per group."""
    labels = selected[group_by].cast(pl.String).fill_null("∅")
    rows, plots = [], []
    for g in sorted(labels.unique().to_list()):
        m = (labels == g).to_numpy()
        plots.append(_histogram_svg(values[m & keep], values[m & ~keep], f"{group_by} = {g}", 530, 170,
                                    span=span, marker=cut, x_label=VALUE_AXIS, marker_label=cut_label))
        n, k = int(m.sum()), int((m & keep).sum())
        rows.append(f"<tr class='group-row'><td>{html.escape(g)}</td><td>{n}</td><td>{k}</td><td>{n - k}</td>"
                    f"<td>{k / max(1, n):.1%}</td><td>{_top_reasons(kinds, m & ~keep)}</td></tr>")
    return (f"<h2>By {html.escape(group_by)}</h2><table class='groups'><tr><th>{html.escape(group_by)}</th>"
            "<th>scored</th><th>kept</th><th>dropped</th><th>retained</th><th>why dropped (samples)</th></tr>"
            + "".join(rows) + "</table><div class='plots'>" + "".join(plots) + "</div>")


def _dropped_html(selected: pl.DataFrame, kinds: list[str], examples: int = 3) -> str:
    """The dropped samples grouped by reason: count and a few examples each, most frequent reason first."""
    dropped = selected.with_columns(pl.Series("reason_kind", kinds)).filter(~pl.col("keep"))
    if dropped.height == 0:
        return "<h2>Dropped samples</h2><p>None: every scored sample was kept.</p>"
    out = ["<h2>Dropped samples by reason</h2><table class='dropped'><tr><th>reason</th><th>samples</th>"
           "<th>examples (lowest value first)</th></tr>"]
    counted = Counter(dropped["reason_kind"].to_list())
    for kind, n in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0])):
        ex = dropped.filter(pl.col("reason_kind") == kind).sort("value").head(examples).to_dicts()
        cells = "<br>".join(f"{_sample_text(r, 90)} <small>({r['value']:.3g})</small>" for r in ex)
        out.append(f"<tr class='reason-row'><td>{html.escape(kind)}</td><td>{n}</td><td>{cells}</td></tr>")
    return "".join(out) + "</table>"


def _reason_codes(selected: pl.DataFrame, kinds: list[str]) -> list[str]:
    """Each row's short drop reason ("" when kept): the select step's ``reason_code`` when the table has it,
    else the reason without the sample's own numbers (:func:`valuegate.tasks.select.reason_kinds`)."""
    if "reason_code" in selected.columns:
        keep = selected["keep"].to_list()
        return ["" if k else (c or "") for k, c in zip(keep, selected["reason_code"].cast(pl.String).to_list(),
                                                       strict=True)]
    return kinds


def funnel_rows(counts: dict[str, Any], selected: pl.DataFrame, codes: list[str]) -> list[tuple[str, int, str, int]]:
    """The run's counts as one funnel, each stage a subset of the one before it.

    Returns:
        ``(stage, count, what it means, indent)`` rows: rows read, quarantined, rows accepted, unique samples,
        not valued, scored, kept, dropped (then one row per drop reason, indent 1), released. A count the
        manifest lacks (an older release) is left out.
    """
    rows: list[tuple[str, int, str, int]] = []
    accepted, quarantined = counts.get("dataset_rows"), counts.get("dataset_quarantined")
    if accepted is not None and quarantined is not None:
        rows.append(("rows read", accepted + quarantined, "rows of every source of the dataset, as they stand", 0))
        rows.append(("quarantined", quarantined, "rows refused at ingest (a malformed or empty field, oversized); "
                     "their reasons are in the workspace's quarantine table", 0))
        rows.append(("rows accepted", accepted, "rows read minus quarantined", 0))
    scored = selected.height
    unscored = int(counts.get("unscored") or 0)
    rows.append(("unique samples", scored + unscored, "distinct contents among the accepted rows (a duplicate "
                 "row counts once)", 0))
    if unscored:
        rows.append(("not valued", unscored, "samples the model could not value (every counted token beyond "
                     "max_length, or none at all)", 0))
    rows.append(("scored", scored, "samples valued against the validation set", 0))
    kept = int(selected["keep"].sum())
    rows.append(("kept", kept, "scored samples the selection policy keeps", 0))
    rows.append(("dropped", scored - kept, "scored samples the selection policy drops, by reason:", 0))
    for code, n in sorted(Counter(c for c in codes if c).items(), key=lambda kv: (-kv[1], kv[0])):
        rows.append((code, n, "", 1))
    if counts.get("released") is not None:
        rows.append(("released", int(counts["released"]), "rows of data.parquet: the kept samples, one row each", 0))
    return rows


def _funnel_html(counts: dict[str, Any], selected: pl.DataFrame, codes: list[str]) -> str:
    body = "".join(
        f"<tr class='funnel-row{' funnel-reason' if indent else ''}'><td>{'&nbsp;&nbsp;&nbsp;&nbsp;' * indent}"
        f"{html.escape(stage)}</td><td class='num'>{n}</td><td>{html.escape(what)}</td></tr>"
        for stage, n, what, indent in funnel_rows(counts, selected, codes))
    return ("<h2>From rows to release</h2><table class='funnel'><tr><th>stage</th><th>count</th><th>what it "
            "means</th></tr>" + body + "</table>")


def _gate_html(gate: dict[str, Any]) -> str:
    """Every gate check with what was observed (the manifest's ``gate.results``), and the Data Docs link."""
    results = gate.get("results") or []
    out = ["<h2>Gate checks</h2>"]
    if results:
        out.append("<table class='gate'><tr><th>check</th><th>observed</th><th>expected</th><th>result</th></tr>"
                   + "".join(f"<tr class='gate-row'><td>{html.escape(str(r.get('name')))}</td>"
                             f"<td>{html.escape(str(r.get('observed')))}</td><td>{html.escape(str(r.get('bound')))}"
                             f"</td><td class='{'ok' if r.get('success') else 'bad'}'>"
                             f"{'passed' if r.get('success') else 'FAILED'}</td></tr>" for r in results)
                   + "</table>")
    if gate.get("docs_index"):
        from valuegate.tasks.gate import DOCS_INDEX

        out.append(f"<p>Great Expectations' own Data Docs: <a href='gate/{DOCS_INDEX.as_posix()}'>gate/"
                   f"{html.escape(DOCS_INDEX.as_posix())}</a> (they load their styles and scripts, Bootstrap, "
                   "jQuery and Vega, from the web: offline their index lists nothing; the table above holds "
                   "every check).</p>")
    return "".join(out)


# the longest text of one field the dropped-rows table carries (the full text is in the release's files), and
# the most rows it carries (about 1 MB of page per 1,000 rows of a few hundred characters: a browser still
# searches 50,000 at once; the rest are said and are in scores.parquet)
DROPPED_TEXT_CHARS = 2000
DROPPED_ROWS_MAX = 50_000


def _clip(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= DROPPED_TEXT_CHARS else text[:DROPPED_TEXT_CHARS] + "…"


def _prompt_response(row: dict[str, Any]) -> tuple[str, str]:
    """A row's prompt and response as text: a chat's turns before its last assistant turn, and that turn;
    a text sample's text as the response."""
    if row.get("messages"):
        import json

        try:
            turns = json.loads(row["messages"]) if isinstance(row["messages"], str) else list(row["messages"])
        except ValueError:
            return "", str(row["messages"])
        last = max((i for i, t in enumerate(turns) if t.get("role") == "assistant"), default=len(turns))

        def said(t: dict[str, Any]) -> str:
            c = t.get("content")
            c = c if isinstance(c, str) else " ".join(p.get("text", "[image]") for p in c or [])
            return f"{t.get('role')}: {c}"

        return "\n".join(said(t) for t in turns[:last]), "\n".join(said(t) for t in turns[last:])
    if row.get("text"):
        return "", row["text"]
    return row.get("prompt") or "", row.get("response") or ""


DROPPED_SCRIPT = r"""
function vgRows(rows, query, reason, key, dir) {
  var q = (query || "").toLowerCase();
  var out = rows.filter(function (r) {
    if (reason && r.code !== reason) return false;
    if (!q) return true;
    return [r.code, r.reason, r.prompt, r.response, r.nearest].some(function (v) {
      return String(v == null ? "" : v).toLowerCase().indexOf(q) >= 0;
    });
  });
  if (key) {
    out.sort(function (a, b) {
      var x = a[key], y = b[key];
      if (x == null && y == null) return 0;
      if (x == null) return 1;
      if (y == null) return -1;
      var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return dir * c;
    });
  }
  return out;
}
(function () {
  var holder = document.getElementById("dropped-data");
  if (!holder || typeof document.querySelector !== "function") return;
  var rows = JSON.parse(holder.textContent), page = 0, size = 100, key = null, dir = 1;
  var body = document.querySelector("#dropped-table tbody"), info = document.getElementById("dropped-info");
  var search = document.getElementById("dropped-search"), pick = document.getElementById("dropped-reason");
  function cell(text, cls) {
    var td = document.createElement("td");
    td.textContent = text == null ? "" : text;
    if (cls) td.className = cls;
    return td;
  }
  function draw() {
    var shown = vgRows(rows, search.value, pick.value, key, dir);
    var pages = Math.max(1, Math.ceil(shown.length / size));
    page = Math.min(page, pages - 1);
    body.textContent = "";
    shown.slice(page * size, page * size + size).forEach(function (r) {
      var tr = document.createElement("tr");
      tr.className = "dropped-row";
      tr.appendChild(cell(r.code));
      tr.appendChild(cell(r.reason, "why"));
      tr.appendChild(cell(r.value == null ? "" : r.value.toPrecision(4), "num"));
      tr.appendChild(cell(r.suspect == null ? "" : r.suspect.toPrecision(3), "num"));
      tr.appendChild(cell(r.prompt, "text"));
      tr.appendChild(cell(r.response, "text"));
      tr.appendChild(cell(r.nearest, "text"));
      body.appendChild(tr);
    });
    info.textContent = shown.length + " of " + rows.length + " dropped rows match; page " + (page + 1) + " of " + pages;
  }
  // the filter lives in the address too (#q=<text>&reason=<code>): a filtered view is a link to share
  function fromHash() {
    var h = (typeof location === "object" && location.hash) ? location.hash.slice(1) : "";
    h.split("&").forEach(function (kv) {
      var i = kv.indexOf("="), k = kv.slice(0, i), v = decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " "));
      if (k === "q") search.value = v;
      if (k === "reason") pick.value = v;
    });
  }
  function toHash() {
    if (typeof history !== "object" || !history.replaceState) return;
    var parts = [];
    if (search.value) parts.push("q=" + encodeURIComponent(search.value));
    if (pick.value) parts.push("reason=" + encodeURIComponent(pick.value));
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
  }
  search.addEventListener("input", function () { page = 0; toHash(); draw(); });
  pick.addEventListener("change", function () { page = 0; toHash(); draw(); });
  document.getElementById("dropped-prev").addEventListener("click", function () { page = Math.max(0, page - 1); draw(); });
  document.getElementById("dropped-next").addEventListener("click", function () { page += 1; draw(); });
  Array.prototype.forEach.call(document.querySelectorAll("#dropped-table th[data-key]"), function (th) {
    th.addEventListener("click", function () {
      var k = th.getAttribute("data-key");
      dir = (key === k) ? -dir : 1;
      key = k;
      draw();
    });
  });
  fromHash();
  draw();
})();
"""


def dropped_records(selected: pl.DataFrame, codes: list[str], valid_text: dict[str, str],
                    similar: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every dropped row as the report's table holds it: ``code`` (the short reason), ``reason`` (the
    sentence), ``value``, ``suspect``, ``prompt``, ``response`` (each clipped at :data:`DROPPED_TEXT_CHARS`)
    and ``nearest``: the validation sample most like it (``similar``: id → validation id, from
    :func:`similar_validation`), else the one its value aligns with most (``nearest_ids``); lowest value
    first."""
    frame = selected.with_columns(pl.Series("_code", codes, dtype=pl.String)).filter(~pl.col("keep")).sort("value")
    out = []
    for r in frame.to_dicts():
        prompt, response = _prompt_response(r)
        near = (similar or {}).get(r["id"]) or next(iter(r.get("nearest_ids") or []), None)
        sus = r.get("suspect")
        out.append({"code": r["_code"], "reason": r.get("reason") or "",
                    "value": float(r["value"]) if r.get("value") is not None else None,
                    "suspect": float(sus) if sus is not None and np.isfinite(sus) else None,
                    "prompt": _clip(prompt), "response": _clip(response),
                    "nearest": _clip(valid_text.get(near, "") if near else "")})
    return out


def similar_validation(root: Store, model_fp: str, ids: list[str], valid_ids: list[str]) -> dict[str, str]:
    """id → the validation sample most like it (:func:`valuegate.engine.faults.most_similar`: the cosine of
    the stored mean hidden states, centred on the validation set's), for the ``ids`` whose features are
    stored; empty when there are none or no validation sample has features."""
    from valuegate.engine.faults import most_similar

    if not ids or not valid_ids or not fstore.features_exist(root, model_fp):
        return {}
    t = fstore.read_features(root, model_fp, ids=list(dict.fromkeys([*ids, *valid_ids])), columns=["id", "mean_hidden"])
    got = t["id"].to_pylist()
    if not got:
        return {}
    hidden = _hidden(t, len(got))
    pos = {i: k for k, i in enumerate(got)}
    vid = [v for v in valid_ids if v in pos]
    rows = [i for i in ids if i in pos]
    if not vid or not rows:
        return {}
    best = most_similar(hidden[[pos[i] for i in rows]], hidden[[pos[v] for v in vid]])
    return {i: vid[b] for i, b in zip(rows, best, strict=True)}


def _dropped_rows_html(selected: pl.DataFrame, codes: list[str], valid_text: dict[str, str],
                       similar: dict[str, str] | None = None) -> str:
    """Every dropped row in one table, searched, filtered by reason, sorted by any column and paged in the
    page itself (inline data and script: no network)."""
    import json

    records = dropped_records(selected, codes, valid_text, similar)
    if not records:
        return ""
    total, records = len(records), records[:DROPPED_ROWS_MAX]
    left_out = (f" The {total - len(records)} dropped rows of highest value past the first {len(records)} are "
                "not in this page (scores.parquet lists them)." if total > len(records) else "")
    data = json.dumps(records, ensure_ascii=False).replace("</", "<\\/")
    options = "".join(f"<option value='{html.escape(c, quote=True)}'>{html.escape(c)} ({n})</option>"
                      for c, n in sorted(Counter(r["code"] for r in records).items(), key=lambda kv: (-kv[1], kv[0])))
    heads = [("code", "reason"), ("reason", "why"), ("value", "value"), ("suspect", "suspect"),
             ("prompt", "prompt"), ("response", "response"), ("nearest", "most similar validation sample")]
    return (f"<h2>Every dropped row</h2><p>{'All ' if not left_out else ''}{len(records)} dropped rows, lowest value "
            f"first.{left_out} Type to search every column, pick a reason, click a column's title to sort (again: "
            f"the other way). Texts longer than {DROPPED_TEXT_CHARS} characters are cut here (the workspace's "
            "samples hold them in full; the release's scores.parquet lists every dropped id and its reason).</p><p><input id='dropped-search' type='search' placeholder='search the dropped rows' size='40'> "
            f"<select id='dropped-reason'><option value=''>every reason</option>{options}</select> "
            "<button id='dropped-prev'>previous</button> <button id='dropped-next'>next</button> "
            "<span id='dropped-info'></span></p><table id='dropped-table' class='dropped-all'><thead><tr>"
            + "".join(f"<th data-key='{k}' title='sort by {t}'>{t} ⇅</th>" for k, t in heads)
            + "</tr></thead><tbody></tbody></table>"
            f"<script type='application/json' id='dropped-data'>{data}</script><script>{DROPPED_SCRIPT}</script>")


def _signal_columns(selected: pl.DataFrame) -> list[str]:
    """The value signals the table carries (``self_influence`` and :data:`SIGNAL_COLUMNS`), not all null."""
    return [c for c in ("self_influence", *SIGNAL_COLUMNS)
            if c in selected.columns and selected[c].null_count() < selected.height]


def _signals_html(selected: pl.DataFrame, keep: np.ndarray) -> str:
    """The faults behind ``suspect``: per fault detector, how many rows it names, how many of them were dropped,
    and its sentence; then each value signal's median over the kept and the dropped samples."""
    from valuegate.engine.faults import DETECTORS

    parts = []
    if "fault" in selected.columns:
        fault = selected["fault"].fill_null("").to_numpy()
        rows = []
        for code, det in DETECTORS.items():
            named = fault == code
            if named.any():
                rows.append(f"<tr><td>{html.escape(code)}</td><td>{int(named.sum())}</td>"
                            f"<td>{int((named & ~keep).sum())}</td><td>{html.escape(det.reason)}</td></tr>")
        if rows:
            parts.append("<h3>The faults behind the suspect score</h3><p>Each sample's suspect score is the largest "
                         "of the fault detectors' calibrated scores; the detector that gives it is its fault.</p>"
                         "<table class='signals'><tr><th>fault</th><th>samples it names</th><th>dropped</th>"
                         "<th>what it means</th></tr>" + "".join(rows) + "</table>")
    cols = _signal_columns(selected)
    if cols:
        rows = []
        for c in cols:
            x = selected[c].cast(pl.Float64).fill_null(np.nan).to_numpy()
            med = [float(np.nanmedian(x[m])) if np.isfinite(x[m]).any() else None for m in (keep, ~keep)]
            rows.append(f"<tr><td>{html.escape(c)}</td>" + "".join(
                f"<td>{v:.4g}</td>" if v is not None else "<td>–</td>" for v in med) + "</tr>")
        parts.append("<h3>Value signals</h3><p>Median of each value signal over the kept and the dropped samples "
                     "(what a sample is worth to the validation set, beside its faults).</p><table class='signals'>"
                     "<tr><th>signal</th><th>median, kept</th><th>median, dropped</th></tr>" + "".join(rows)
                     + "</table>")
    return "".join(parts)


def _detection_html(selected: pl.DataFrame, keep: np.ndarray, column: str) -> str:
    """How well the release, the suspect score, the value, the cheap filters (:func:`flag_sides`) and each
    signal find the rows the known-bad ``column`` marks: the dropped counts per corruption type, then one
    AUC table (a column per type, the best of each column in bold)."""
    kinds = bad_kinds(selected[column].to_list())
    filters = flag_sides()
    bad = kinds != ""
    types = sorted({k for k in kinds if k})
    out = [f"<h2>Known-bad samples</h2><p>The column <code>{html.escape(column)}</code> marks "
           f"{int(bad.sum())} of {kinds.size} samples as bad; this release drops {int((bad & ~keep).sum())} of them "
           f"and {int((~bad & ~keep).sum())} of the {int((~bad).sum())} clean samples.</p>"]
    if not 0 < bad.sum() < bad.size:
        return "".join(out)
    out.append("<table class='detection-counts'><tr><th>corruption</th><th>samples</th><th>dropped</th></tr>"
               + "".join(f"<tr><td>{html.escape(t)}</td><td>{int((kinds == t).sum())}</td>"
                         f"<td>{int(((kinds == t) & ~keep).sum())}</td></tr>" for t in types) + "</table>")
    scores: dict[str, tuple[np.ndarray, float]] = {}
    labels: dict[str, str] = {}
    for col, side, what in [("suspect", 1.0, "suspect score (valuegate; high = bad)"),
                            ("value", -1.0, "value (valuegate; low = bad)"),
                            *((c, s, what) for c, (s, what) in filters.items()),
                            *((c, 1.0, f"signal {c} (high = bad)") for c in _signal_columns(selected))]:
        if col in selected.columns and selected[col].null_count() < selected.height:
            scores[col] = (selected[col].cast(pl.Float64).fill_null(np.nan).to_numpy(), side)
            labels[col] = what
    rows = detection_rows(scores, kinds)
    heads = ["all", *types]
    best = {h: max((r.auc[h] for r in rows if r.auc[h] is not None), default=None) for h in heads}
    body = []
    for r in rows:
        cls = "baseline" if r.score in filters else "valuegate" if r.score in ("suspect", "value") else "signal"
        cells = "".join("<td>–</td>" if r.auc[h] is None else
                        (f"<td><b>{r.auc[h]:.3f}</b></td>" if r.auc[h] == best[h] else f"<td>{r.auc[h]:.3f}</td>")
                        for h in heads)
        body.append(f"<tr class='detection-row {cls}'><td>{html.escape(labels[r.score])}</td>{cells}</tr>")
    out.append("<table class='detection'><tr><th>score</th>" + "".join(
        f"<th>{html.escape(h)} ({int(bad.sum()) if h == 'all' else int((kinds == h).sum())})</th>" for h in heads)
        + "</tr>" + "".join(body) + "</table><p><small>Detection AUC: the chance that a bad sample of the column's "
        "type ranks as more suspect than a clean one (1 finds every bad sample first, 0.5 is chance, below 0.5 "
        "the score points the other way); each filter on the side it drops; the best of each column in bold. "
        "A score missing on some samples (IFD of a text sample) is measured on the others.</small></p>")
    return "".join(out)


def _plain_text(row: dict[str, Any]) -> str:
    """A sample's content as plain text (not escaped): the text, the chat's turns, or prompt ⟶ response."""
    prompt, response = _prompt_response(row)
    return f"{prompt} ⟶ {response}" if prompt else response


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
    data = read_image_data(open_store(workspace), hashes)
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
                  suspect_threshold: float | None = None, thumbnails: dict[str, str] | None = None,
                  known_bad: str | None = "corruption", similar: dict[str, str] | None = None) -> str:
    """The report of one release as an HTML string.

    Args:
        selected: every scored sample with ``id``, ``value``, ``keep``, ``reason`` and content columns.
        manifest: the release manifest (counts, gate, valset, policy).
        valid_rows: the validation samples (``id`` and content) to show beside nearest ids.
        diff_text: what changed since the previous release, as text.
        group_by: the column whose groups get their own plot and retention row.
        explained: ``(label, row, TokenContributions)`` of the few samples whose tokens are highlighted.
        suspect_threshold: drawn on the suspect histogram when the policy uses it.
        known_bad: the data's known-bad column (``release.known_bad_column``): when the samples carry it, the
            detection table of valuegate's scores against the cheap filters; None: never.
        thumbnails: sha256 → image URI for samples with an ``images`` column (content hashes); by default
            loaded from the workspace named in ``manifest["settings"]`` for the samples the report shows.
        similar: dropped id → the validation sample most like it (:func:`similar_validation`), shown in the
            table of every dropped row (else the one its value aligns with most).
    """
    values = selected["value"].to_numpy()
    keep = selected["keep"].to_numpy()
    thumbs = thumbnails
    if "images" in selected.columns and thumbs is None:
        thumbs = _shown_thumbnails(selected, manifest)
    vtext = {r["id"]: _sample_text(r, 100) for r in valid_rows}
    vtext_full = {r["id"]: _plain_text(r) for r in valid_rows}
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
        ".plots{display:flex;flex-wrap:wrap;gap:4px 16px}th{background:#f3f3f3;text-align:left}"
        ".num{text-align:right}.funnel-reason td{color:#555}#dropped-table th{cursor:pointer}"
        "#dropped-table td.text{white-space:pre-wrap;max-width:320px;word-break:break-word}"
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
    kinds = _reason_kinds(selected, manifest.get("policy") or {})
    codes = _reason_codes(selected, kinds)
    parts.append(_funnel_html(manifest.get("counts", {}), selected, codes))
    policy = manifest.get("policy") or {}
    reads_suspect = policy.get("policy") == "suspect"
    cut = None if reads_suspect else policy_cutoff(manifest, selected.filter(pl.col("keep"))["value"])
    parts.append("<h2>Value distribution</h2>")
    span = (float(values.min()), float(values.max())) if values.size else None
    cut_label = f"cut-off {cut:.3g} ({policy.get('policy')})" if cut is not None else None
    parts.append(_histogram_svg(values[keep], values[~keep], "all samples (green kept, red dropped)", span=span,
                                marker=cut, x_label=VALUE_AXIS, marker_label=cut_label))
    if group_by and group_by in selected.columns:
        parts.append(_groups_html(selected, group_by, kinds, values, keep, span, cut, cut_label))
    parts.append(_dropped_html(selected, kinds))
    parts.append(_dropped_rows_html(selected, codes, vtext_full, similar))
    if known_bad and known_bad in selected.columns:  # e.g. the demo marks the rows it corrupted
        parts.append(_detection_html(selected, keep, known_bad))
    if "suspect" in selected.columns and selected["suspect"].null_count() < selected.height:
        sus = selected["suspect"].fill_null(np.nan).to_numpy().astype(np.float64)
        ok = np.isfinite(sus)
        parts.append("<h2>Suspect score</h2><p>How strongly the most confident fault detector fires on each "
                     "sample, against samples like it (calibrated robust z units; higher = more suspect)"
                     + (f"; the policy drops samples above {suspect_threshold:g}" if suspect_threshold else "")
                     + ".</p>")
        parts.append(_histogram_svg(sus[ok & keep], sus[ok & ~keep], "suspect (green kept, red dropped)",
                                    marker=suspect_threshold, x_label=SUSPECT_AXIS,
                                    marker_label=f"threshold {suspect_threshold:g}" if suspect_threshold else None))
        parts.append(_signals_html(selected, keep))
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
    parts.append(_gate_html(gate))
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


def write_report(path: Path, content: str) -> Path:
    """Write the report atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# the ``report`` step of the refresh DAG
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportResult:
    """What :func:`run` did.

    Attributes:
        path (str): where the report is (a local path, or an ``s3://`` URI).
        written (bool): whether this call wrote it (False: the version was already complete).
        warnings (tuple[str, ...]): what the report lacks and why (one line each), e.g. no per-token
            highlighting.
    """

    path: str
    written: bool
    warnings: tuple[str, ...] = ()


def explain_stored(ws, settings, valset_ref: str, records: list[dict], lm: LoadedModel | None = None,
                   progress: bool = False) -> list[TokenContributions]:
    """:func:`token_contributions` for stored samples against a registered validation-set version whose
    features are in the store (as after ``score_dataset``).

    Args:
        ws: the workspace. settings: the resolved settings the scores were computed with.
        valset_ref: ``name@vN``. records: sample records (``kind``, ``prompt``, ``response``, ``messages``,
            ``text``), e.g. rows of a scores table. lm: the loaded model, or None to load it.
    """
    if not records:
        return []
    tok = lm.tokenizer if lm is not None else load_tokenizer(settings.model)
    _, fp_v = feature_fingerprint(settings, tok, 1.0)
    meta = fstore.read_feature_set(ws, fp_v)
    if meta is None:
        raise ValuegateError(f"no validation features for {valset_ref}: score the dataset first")
    _, vrows = read_valset(ws, valset_ref)
    vids, _ = valset_samples(vrows)
    vocab, width = int(meta["vocab_size"]), int(meta["row_width"])
    vm, _ = _feature_matrix(fstore.read_features(ws, fp_v, vids, ["id", "token_ids", "rows"]), vids, vocab, width)
    lm = lm if lm is not None else load_model(settings.model, tok, progress)
    samples = attach_image_data(ws, [sample_from_record(r, row=i) for i, r in enumerate(records)])
    return token_contributions(lm, samples, mean_rows(vm, vocab, width), settings.extract)


def _explain(settings: Settings, selected: pl.DataFrame, valset: str) -> tuple[list, str | None]:
    """Per-token contributions of the samples the report highlights (one forward pass of a few samples),
    and None; or no contributions and why (the report is still written)."""
    picked = pick_explained(selected)
    try:
        tcs = explain_stored(open_store(settings.workspace), settings, valset, [row for _, row in picked])
    except (ValuegateError, OSError) as exc:
        return [], f"report: no per-token highlighting ({exc})"
    return [(label, row, tc) for (label, row), tc in zip(picked, tcs, strict=True)], None


def run(settings: Settings, selected: pl.DataFrame, version: str, previous: str | None,
        record: dict[str, Any]) -> ReportResult:
    """Render report.html (plots, top/bottom samples, change since the ``previous`` release) from the
    release's completion ``record`` in memory, then complete the release: the report copied in,
    ``manifest.json`` last.

    Idempotent: a version already complete (a resumed one) is left as it is.
    """
    root = open_store(settings.workspace)
    name = settings.release.name
    where = f"{rstore.release_uri(root, name, version)}/report.html"
    if rstore.release_exists(root, name, version):
        return ReportResult(where, False)
    _, vrows = read_valset(root, record["valset"])
    kept = selected.filter(selected["keep"])
    measures = ["value", *(["suspect"] if "suspect" in selected.columns else [])]
    diff_text = format_diff(diff_candidate(root, name, previous, record, kept.select("id", *measures),
                                           selected.select("id", *measures))) if previous else None
    explained, warning = _explain(settings, selected, record["valset"])
    threshold = settings.select.suspect_threshold if settings.select.policy == "suspect" else None
    dropped = selected.filter(~selected["keep"]).sort("value")["id"].head(DROPPED_ROWS_MAX).to_list()
    similar = similar_validation(root, record["model_fp"], dropped, valset_samples(vrows)[0])
    html_text = render_report(selected, record, vrows.to_pylist(), diff_text, settings.select.group_by,
                              explained, threshold, known_bad=settings.release.known_bad_column, similar=similar)
    staged = Path(staging_dir(settings, version, "report")) / "report.html"
    staged.parent.mkdir(parents=True, exist_ok=True)
    try:
        rstore.complete_release(root, name, version, record, {"report.html": write_report(staged, html_text)})
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
    return ReportResult(where, True, (warning,) if warning else ())
