"""The release report renders in a real browser (headless Chromium), and says what it must."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest

from valuegate.tasks.report import render_report, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _selected(n: int = 60) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    values = rng.normal(size=n)
    return pl.DataFrame({
        "id": [f"id{i:03d}" for i in range(n)],
        "prompt": [f"prompt {i} <b>not bold</b> " for i in range(n)],
        "response": [f"response {i}" for i in range(n)],
        "text": [None] * n, "messages": [None] * n,
        "family": ["ab"[i % 2] for i in range(n)],
        "corruption": ["swap" if i % 5 == 0 else "" for i in range(n)],
        "value": values, "keep": values >= 0,
        "reason": ["" if v >= 0 else f"value {v:.3g} < 0" for v in values],
        "reason_code": ["" if v >= 0 else "negative_value" for v in values],
        "nearest_ids": [["v1", "v2"]] * n,
        "suspect": np.abs(values) * 2, "fault": ["cut"] * n,
        "suspect_reason": ["the answer stops before it is finished, or a part of it is missing"] * n,
        "mean_loss": 2.0 - values / 2,
    })


def _explained():
    from valuegate.engine.explain import TokenContributions

    tc = TokenContributions(["Add", " 2", " + 2", " =", " 4", "<b>"], [None, None, None, None, 0.7, -0.2], 0.5)
    return [("lowest-valued", {"value": 0.5}, tc)]


def _manifest() -> dict:
    return {"name": "r", "version": "v0002", "valset": "val@v3", "model_fp": "ab" * 32,
            "policy": {"policy": "drop_negative", "aggregate": "mean"},
            "gate": {"passed": False, "failures": ["expect_column_values_to_be_between(retained_fraction): 0.4"]},
            "counts": {"rows": 60, "kept": 31}}


def test_report_content_is_complete_and_escaped(tmp_path):
    html_text = render_report(_selected(), _manifest(), [{"id": "v1", "text": "a validation sample"}],
                              "entered: 3 (new data)", group_by="family", explained=_explained(),
                              suspect_threshold=3.0)
    assert html_text.count("<svg") == 4  # overall + one per group + suspect
    assert html_text.count("samples per bin") == 4 and "value (For-Value score" in html_text
    assert "cut-off 0 (drop_negative)" in html_text and "threshold 3" in html_text  # the cut-offs are marked
    assert html_text.count("class='group-row'") == 2 and "why dropped" in html_text
    assert "Dropped samples by reason" in html_text and "value &lt; 0" in html_text
    assert "The faults behind the suspect score" in html_text and "<td>cut</td><td>60</td>" in html_text
    assert "Value signals" in html_text and "<td>mean_loss</td>" in html_text
    assert html_text.count("class='detection-row ") == 3  # suspect, value, mean_loss (no baseline columns)
    assert "Most suspect samples" in html_text and "the answer stops before it is finished" in html_text
    assert "Which tokens carry the value" in html_text and "title='+0.7'" in html_text
    assert "rgba(201,42,42" in html_text and "&lt;b&gt;" in html_text  # negative token, escaped
    assert "marks 12 of 60 samples as bad" in html_text and "Detection AUC" in html_text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html_text and "<b>not bold</b>" not in html_text
    assert "a validation sample" in html_text and "entered: 3 (new data)" in html_text
    assert "FAILED" in html_text and "retained_fraction" in html_text
    path = write_report(tmp_path / "report.html", html_text)
    assert path.read_text(encoding="utf-8") == html_text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (CI installs it: apt-get "
                    "install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    path = write_report(tmp_path / "report.html",
                        render_report(_selected(), _manifest(), [], None, group_by="family",
                                      explained=_explained(), suspect_threshold=3.0))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600"]
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", path.as_uri()], check=True, timeout=120,
                   capture_output=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real page, not a blank one
    if os.environ.get("VALUEGATE_REPORT_SHOT"):  # to look at it: VALUEGATE_REPORT_SHOT=/tmp/report.png
        shutil.copyfile(shot, os.environ["VALUEGATE_REPORT_SHOT"])
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", path.as_uri()], check=True, timeout=120,
                         capture_output=True, text=True).stdout
    assert dom.count("<svg") == 4 and "Lowest-valued samples" in dom and "<rect" in dom
    assert "Which tokens carry the value" in dom
    # what a reader needs: labelled axes, the cut-offs, one row per group, drops by reason, detection
    assert dom.count('class="axis-label"') == 8 and dom.count("samples per bin") == 4
    assert dom.count('class="threshold"') == 4  # value cut-off on 3 value plots, threshold on suspect
    assert dom.count('class="group-row"') == 2 and "Dropped samples by reason" in dom
    assert dom.count('class="reason-row"') == 1 and dom.count('class="detection-row ') == 3


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (CI installs it: apt-get "
                    "install chromium)")
def test_the_dropped_rows_table_filters_in_chromium(tmp_path):
    """The page's own script, in a real browser: the whole table, then the view a link with a filter opens
    (``#q=...``, what typing in the search box writes to the address), then a reason picked by the link."""
    import re
    from urllib.parse import quote

    sel = _selected()
    path = write_report(tmp_path / "report.html", render_report(sel, _manifest(), []))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]

    def shown(fragment: str) -> tuple[int, str]:
        dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", path.as_uri() + fragment], check=True, timeout=120,
                             capture_output=True, text=True).stdout
        info = re.search(r'<span id="dropped-info">(.*?)</span>', dom).group(1)
        return dom.count('class="dropped-row"'), info

    dropped = sel.filter(~pl.col("keep"))
    assert shown("") == (dropped.height, f"{dropped.height} of {dropped.height} dropped rows match; page 1 of 1")
    want = dropped.filter(pl.col("prompt").str.contains("prompt 1")).height  # prompt 1, 10-19 (the dropped ones)
    assert 0 < want < dropped.height
    assert shown("#q=" + quote("PROMPT 1")) == (want, f"{want} of {dropped.height} dropped rows match; page 1 of 1")
    (code,) = re.findall(r"<option value='([^']+)'>", path.read_text(encoding="utf-8"))  # one reason here
    assert shown(f"#reason={code}&q=" + quote("prompt 1"))[0] == want
    assert shown("#q=no+such+row") == (0, f"0 of {dropped.height} dropped rows match; page 1 of 1")


def test_detection_table_sets_valuegate_against_the_cheap_filters_per_corruption_type():
    """Issue 18: with a known-bad column the report has a row per cheap filter (each on the side it drops) and a
    column per corruption type, the best per column in bold; the column is a setting; booleans work."""
    n = 60
    kinds = ["swap" if i % 6 == 0 else "copy" if i % 6 == 1 else "" for i in range(n)]
    swap = np.array([k == "swap" for k in kinds])
    copy = np.array([k == "copy" for k in kinds])
    rng = np.random.default_rng(1)
    sel = _selected(n).with_columns(
        pl.Series("corruption", kinds),
        pl.Series("suspect", np.where(copy, 10.0, 0.0) + rng.random(n)),  # finds copy only
        pl.Series("perplexity", np.where(swap, 50.0, 5.0) + rng.random(n)),  # finds swap (drops high)
        pl.Series("length", np.where(swap, 3.0, 30.0) + rng.random(n)),  # finds swap (drops short)
        pl.Series("ifd", [None if i % 10 == 3 else 0.5 + rng.random() for i in range(n)], dtype=pl.Float64),
        pl.Series("rds_mean", rng.random(n)), pl.Series("rds_max", rng.random(n)))
    text = render_report(sel, _manifest(), [], None)
    table = text[text.index("<table class='detection'>"):]
    table = table[:table.index("</table>")]
    assert "<th>all (20)</th><th>copy (10)</th><th>swap (10)</th>" in table
    assert table.count("class='detection-row baseline'") == 5
    for label in ("perplexity filter (drops high)", "IFD filter (drops high)", "RDS+ mean similarity (drops low)",
                  "RDS+ max similarity (drops low)", "length filter (drops short)"):
        assert label in table
    row = {r.split("</td>")[0].split("<td>")[-1]: r for r in table.split("<tr")[2:]}
    assert row["perplexity filter (drops high)"].endswith("<td><b>1.000</b></td></tr>")  # swap: its last column
    assert row["suspect score (valuegate; high = bad)"].count("<b>1.000</b>") == 1  # copy
    assert row["length filter (drops short)"].endswith("<td><b>1.000</b></td></tr>")  # swap
    assert "<td>copy</td><td>10</td>" in text  # dropped counts per type
    assert "Known-bad samples" not in render_report(sel, _manifest(), [], None, known_bad=None)
    flagged = sel.with_columns(pl.Series("is_bad", swap))
    text = render_report(flagged, _manifest(), [], None, known_bad="is_bad")
    assert "<th>all (10)</th><th>bad (10)</th>" in text


def test_detection_auc_counts_ties_half():
    from valuegate.engine.detection import detection_auc

    assert detection_auc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert detection_auc(np.array([0.0, 1.0]), np.array([True, False])) == 0.0
    assert detection_auc(np.array([1.0, 1.0, 1.0]), np.array([True, False, False])) == 0.5


def test_pick_explained_takes_each_kind_once():
    from valuegate.tasks.report import pick_explained

    picks = pick_explained(_selected(), per_kind=2)
    labels = [lab for lab, _ in picks]
    assert labels.count("lowest value") == labels.count("highest value") == labels.count("most suspect") == 2
    assert len({row["id"] for _, row in picks}) == 6


def test_the_counts_are_one_funnel_and_every_dropped_row_is_in_the_page():
    """Issue 28: rows read -> quarantined -> unique samples -> scored -> kept / dropped by reason -> released,
    and every dropped row (not 3 per reason) in a table the page itself searches and sorts."""
    from valuegate.tasks.report import dropped_records, funnel_rows

    sel = _selected()
    manifest = {**_manifest(), "counts": {"rows": 0, "kept": 0, "dataset_rows": 64, "dataset_quarantined": 6,
                                          "scored": 60, "unscored": 2, "released": int(sel["keep"].sum())},
                "gate": {"passed": True, "failures": [], "docs_index": "/x/gx/index.html",
                         "results": [{"name": "retained_fraction", "observed": 0.5, "bound": ">= 0.25",
                                      "success": True}]}}
    stages = {stage: n for stage, n, _, indent in funnel_rows(manifest["counts"], sel, [""] * 60) if not indent}
    dropped = int((~sel["keep"]).sum())
    assert list(stages) == ["rows read", "quarantined", "rows accepted", "unique samples", "not valued", "scored",
                            "kept", "dropped", "released"]
    assert (stages["rows read"], stages["quarantined"], stages["unique samples"], stages["scored"]) == (70, 6, 62, 60)
    assert stages["kept"] + stages["dropped"] == 60 and stages["dropped"] == dropped
    html_text = render_report(sel, manifest, [{"id": "v1", "prompt": "a validation question", "response": "ok"}])
    assert "From rows to release" in html_text and "<h2>Counts</h2>" not in html_text
    assert "negative_value" in html_text.split("From rows to release")[1].split("</table>")[0]  # dropped by reason
    assert "value &lt; 0" in html_text.split("Dropped samples by reason")[1].split("</table>")[0]  # its kind, in words
    records = dropped_records(sel, ["" if k else "value < 0" for k in sel["keep"].to_list()],
                              {"v1": "a validation question ⟶ ok"})
    assert len(records) == dropped and [r["value"] for r in records] == sorted(r["value"] for r in records)
    assert records[0]["prompt"].startswith("prompt ") and records[0]["nearest"] == "a validation question ⟶ ok"
    import re

    assert html_text.count("id='dropped-data'") == 1
    assert re.search(r"(src|href)=['\"]?(https?:)?//", html_text) is None  # nothing from the network
    assert "Gate checks" in html_text and "gate/gx/uncommitted/data_docs/local_site/index.html" in html_text
    # without a reason code column (a table select_samples did not write), the reasons as they stand
    uncoded = sel.drop("reason_code")
    assert "negative_value" not in render_report(uncoded, manifest, [])


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_dropped_rows_script_filters_and_sorts(tmp_path):
    """The page's own filter and sort (vgRows), run by node on the rows the page embeds."""
    import json
    import re

    from valuegate.tasks.report import DROPPED_SCRIPT

    sel = _selected()
    page = render_report(sel, _manifest(), [])
    data = re.search(r"<script type='application/json' id='dropped-data'>(.*?)</script>", page, re.S).group(1)
    js = tmp_path / "t.js"
    js.write_text("var document = {getElementById: function () { return null; }};\n" + DROPPED_SCRIPT
                  + f"\nvar rows = {data};\n"
                  "var hit = vgRows(rows, 'PROMPT 1', '', 'value', -1);\n"
                  "var byReason = vgRows(rows, '', rows[0].code, null, 1);\n"
                  "console.log(JSON.stringify({n: rows.length, hit: hit.map(function (r) { return r.prompt; }),"
                  " values: hit.map(function (r) { return r.value; }), reason: byReason.length}));\n")
    out = json.loads(subprocess.run(["node", str(js)], check=True, capture_output=True, text=True).stdout)
    dropped = sel.filter(~pl.col("keep"))
    assert out["n"] == dropped.height
    want = dropped.filter(pl.col("prompt").str.to_lowercase().str.contains("prompt 1")).sort("value", descending=True)
    assert out["hit"] == want["prompt"].to_list() and out["values"] == want["value"].to_list()
    assert out["reason"] == dropped.height  # one reason kind in this table: "value < 0"


def test_a_dropped_rows_table_past_its_limit_says_what_it_leaves_out(monkeypatch):
    from valuegate.tasks import report as report_mod

    monkeypatch.setattr(report_mod, "DROPPED_ROWS_MAX", 5)
    sel = _selected()
    dropped = int((~sel["keep"]).sum())
    page = render_report(sel, _manifest(), [])
    assert f"The {dropped - 5} dropped rows of highest value past the first 5 are not in this page" in page
    assert page.split("id='dropped-data'>")[1].count('"code"') == 5
