"""What `valuegate run` prints when it is done (issue 16): a few human lines on stdout (the release and
whether it is current, kept / dropped with the top reasons, the gate, truncated / unscored counts, the
report as a file:// URL), or with ``--json`` one unambiguous JSON object for machines; and the embedded
demo's workspace lands in the working directory, never in the checkout or the install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from tiny import run_config

REPO = Path(__file__).resolve().parents[1]


def _run(api: str, *args: str, cwd: Path | None = None) -> str:
    """`valuegate run ARGS` as its own process (as a user runs it) on the harness's API: its stdout."""
    proc = subprocess.run([sys.executable, "-m", "valuegate.cli", "run", "--quiet", *args], cwd=cwd,
                          env={**os.environ, "PREFECT_API_URL": api}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _config(tmp_path: Path, model_dir: Path, **extract) -> str:
    """30 training rows in two families, top 75 % kept (so 23 kept, 7 dropped for one reason)."""
    return run_config(tmp_path, model_dir, train=(30, 61), valid=(5, 62), families=True, relative=True,
                      extract=extract, select={"policy": "top_fraction", "fraction": 0.75, "group_by": "family"},
                      gate={"min_retained_fraction": 0.5, "min_group_retention": 0.1})


def _file_url_path(line: str) -> Path:
    url = line.split()[-1]
    assert url.startswith("file://"), line
    return Path(url2pathname(urlparse(url).path))


def test_run_ends_with_human_lines(prefect_harness, tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir())
    out = _run(prefect_harness, "--config", config)
    lines = out.splitlines()
    assert "{" not in out, out  # no JSON dump for people
    assert lines[0] == "release r/v0001 is current (previous: none)", out
    assert lines[1] == "kept 23 of 30 scored, dropped 7: 7 × not in the top 75%", out
    assert "gate: passed" in lines, out
    assert not any(line.startswith(("truncated", "unscored")) for line in lines), out  # zero: not said
    report = _file_url_path(lines[-1])
    assert lines[-1].startswith("report: file://") and report.is_file(), out
    assert report.is_relative_to(tmp_path / "ws"), report

    again = _run(prefect_harness, "--config", config).splitlines()  # the same inputs: nothing to write (issue 28)
    assert again[0].startswith("nothing changed since v0001: release r/v0001 stays current"), again
    assert again[-1] == lines[-1]  # the current release's report


def test_truncated_samples_are_said(prefect_harness, tmp_path, tiny_model_dir):
    # prompt + response as they are (the chat template's turn headers alone would fill 8 tokens)
    config = _config(tmp_path, tiny_model_dir(), max_length=8, template="none")
    out = _run(prefect_harness, "--config", config)
    summary = json.loads(_run(prefect_harness, "--config", config, "--json"))
    n = summary["counts"]["truncated"]
    assert n > 0
    assert f"truncated: {n} of 30 samples valued on their first 8 tokens only (extract.max_length)" in \
        out.splitlines(), out


def test_run_json_is_one_unambiguous_object(prefect_harness, tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir())
    out = json.loads(_run(prefect_harness, "--config", config, "--json"))  # the whole of stdout is the object
    assert out["version"] == "v0001" and out["current"] is True and out["previous"] is None
    assert out["release"] == "r" and out["gate"]["passed"] is True and out["gate"]["failures"] == []
    assert out["kept"] == 23 and out["dropped"] == 7 and out["dropped_reasons"] == {"not in the top 75%": 7}
    counts = out["counts"]
    assert "kept" not in counts  # ingest's kept rows and the selection's kept samples no longer share a name
    assert counts["ingested"] == {"rows": 30, "kept": 30, "new_samples": 30, "duplicates": 0,
                                  "quarantined": 0, "left": 0}
    assert counts["scored"] == 30 and counts["released"] == 23 and counts["dataset_rows"] == 30
    assert Path(out["report"]).is_file()


def test_demo_writes_its_workspace_where_the_user_stands(prefect_harness, tmp_path, tiny_model_dir):
    """No --config: the embedded demo; its workspace is ./valuegate-workspace of the working directory
    (before: the checkout's, through a chdir to the repository root)."""
    here = tmp_path / "empty"
    here.mkdir()
    repo_ws = REPO / "valuegate-workspace"
    before = sorted(p.name for p in (repo_ws / "releases" / "demo").glob("v*")) if repo_ws.exists() else None
    out = json.loads(_run(prefect_harness, "--model", str(tiny_model_dir()), "--json", cwd=here))
    current = here / "valuegate-workspace" / "releases" / "demo" / "CURRENT"
    assert current.is_file() and out["release"] == "demo" and out["current"] is True
    assert Path(out["report"]).is_relative_to(here)
    after = sorted(p.name for p in (repo_ws / "releases" / "demo").glob("v*")) if repo_ws.exists() else None
    assert after == before  # nothing added to the checkout


def test_serve_without_config_serves_the_embedded_demo():
    """`valuegate serve` with no --config said it served the demo but passed no config (the scheduled run
    then had no sources): it passes the demo's config file."""
    from pathlib import Path

    from valuegate.cli import _parser, _serve_config

    config = _serve_config(_parser().parse_args(["serve"]))
    assert config is not None and Path(config).name == "demo.toml" and Path(config).is_file()
    assert _serve_config(_parser().parse_args(["serve", "--config", "x.toml"])) == str(Path("x.toml").resolve())
