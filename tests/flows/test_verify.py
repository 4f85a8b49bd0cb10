"""``valuegate verify`` on a damaged workspace (issue 26): every table read whole and every release checked
against its manifest; damaged features and scores are dropped and the next run derives them again (the
step cache forgets their answers); damaged samples and releases are reported and never rewritten."""

from __future__ import annotations

import contextlib
import hashlib
import io

from test_flow import _config, _run

from valuegate.cli import main


def _fragment(ws, table: str):
    return sorted((ws / f"{table}.lance" / "data").iterdir())[0]


def _truncate(path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def _zero(path) -> None:
    with open(path, "r+b") as fh:
        fh.write(b"\0" * path.stat().st_size)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(ws, *flags) -> tuple[int, list[str]]:
    """``valuegate verify``: its exit code and its lines (not capsys: Prefect's log handler keeps the
    stream it first met, which capsys closes after its test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["verify", "--workspace", str(ws), *flags])
    assert err.getvalue().startswith("valuegate verify "), err.getvalue()
    return code, out.getvalue().splitlines()


def test_verify_repairs_derived_tables_and_reports_samples_and_releases(prefect_harness, tmp_path,
                                                                         tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir())
    first, _ = _run(config)
    ws = tmp_path / "ws"
    code, lines = _verify(ws)
    assert code == 0 and all(ln.startswith("ok ") for ln in lines), lines
    assert any("release r/v0001" in ln for ln in lines) and any("table samples" in ln for ln in lines)

    # damage: a features fragment truncated, the scores zeroed, a sample fragment truncated, a release's data
    # changed after its manifest
    (features,) = [p.name[: -len(".lance")] for p in ws.glob("features__*.lance")]
    _truncate(_fragment(ws, features))
    _zero(_fragment(ws, "scores"))
    samples = _fragment(ws, "samples")
    _truncate(samples)
    data = ws / "releases" / "r" / first["version"] / "data.parquet"
    with open(data, "ab") as fh:
        fh.write(b"tampered")
    before = {p: _sha(p) for p in (samples, data)}

    code, lines = _verify(ws, "--no-repair")
    assert code == 6
    damaged = sorted(ln.split()[2].rstrip(":") for ln in lines if ln.startswith("DAMAGED"))
    assert damaged == sorted([features, "scores", "samples", f"r/{first['version']}"]), lines
    assert (ws / f"{features}.lance").is_dir()  # --no-repair drops nothing

    code, lines = _verify(ws)
    assert code == 6  # samples and the release stay damaged: never rewritten
    repaired = sorted(ln.split()[2].rstrip(":") for ln in lines if ln.startswith("REPAIRED"))
    assert repaired == sorted([features, "scores"]), lines
    assert not (ws / f"{features}.lance").exists() and not (ws / "scores.lance").exists()
    assert any(ln.startswith(f"DAMAGED  release r/{first['version']}: data.parquet does not match") for ln in lines)
    assert {p: _sha(p) for p in before} == before


def test_after_verify_drops_damaged_features_the_next_run_extracts_them_again(prefect_harness, tmp_path,
                                                                               tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir())
    _run(config)
    ws = tmp_path / "ws"
    (features,) = [p.name[: -len(".lance")] for p in ws.glob("features__*.lance")]
    _truncate(_fragment(ws, features))
    _zero(_fragment(ws, "scores"))
    code, lines = _verify(ws)
    assert code == 0, lines
    second, _ = _run(config)  # the cached extract and score answers are forgotten: both run again
    assert second["counts"]["extracted"] == 24 and "extract" not in second["cached_steps"]
    assert second["version"] == "v0002" and second["current"]
    code, lines = _verify(ws)
    assert code == 0 and all(ln.startswith("ok ") for ln in lines), lines
