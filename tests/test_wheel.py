"""The wheel, not the checkout (issue 16): built from the project, installed into a fresh virtual environment
with the README's pinned torch, ``valuegate run`` in an empty directory runs the embedded demo (shipped as
package data) and leaves the workspace and a current release in that directory, and writes nothing into
the install.

Slow: it builds the wheel and installs every dependency into a new environment (from pip's cache and the
machine's wheels after the first time), then runs the demo on the embedded default model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from valuegate.default_model import default_model_cached, default_model_dir, valuegate_home

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the README's (and the Makefile's) pin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.default_model,
    pytest.mark.skipif(not default_model_cached(),
                       reason=f"embedded default model not in the cache ({default_model_dir()}); run `make model`"),
    pytest.mark.timeout(3600),
]


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _listing(root: Path) -> dict[str, int]:
    """Every file under ``root``: its path relative to root and its size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _alpaca(path: Path, n: int, offset: int = 0) -> None:
    """``n`` Alpaca rows (instruction, input, output) as one indented JSON array, the way alpaca_data.json
    ships; every third row has an input."""
    import json

    rows = []
    for i in range(offset, offset + n):
        a, b = i % 17 + 2, i % 5 + 3
        rows.append({"instruction": f"Add {a} and {b}, and say the sum in a sentence.", "input": "",
                     "output": f"{a} plus {b} is {a + b}."} if i % 3 else
                    {"instruction": "Rewrite the sentence in the past tense.", "input": f"I walk {a} miles to the lake.",
                     "output": f"I walked {a} miles to the lake."})
    path.write_text(json.dumps(rows, indent=4))


def test_wheel_runs_the_demo_in_an_empty_directory(tmp_path):
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    wheels, src = tmp_path / "wheels", tmp_path / "src"
    # built from a copy of the sources: no stale build/ of the checkout in the wheel, nothing written there
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "valuegate-workspace", "bench-results",
        ".pytest_cache", ".ruff_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)], 900)
    (wheel,) = wheels.glob("valuegate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"valuegate/demo/demo.toml", "valuegate/demo/data/train.jsonl",
            "valuegate/demo/data/valid.jsonl"} <= set(names), names
    timings["wheel"] = time.perf_counter() - clock

    clock = time.perf_counter()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 300)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PREFECT_API_URL", "VALUEGATE_WORKSPACE")}
    _run([str(py), "-m", "pip", "install", "-q", TORCH], 1800, env=env)
    _run([str(py), "-m", "pip", "install", "-q", str(wheel)], 1800, env=env)
    timings["install"] = time.perf_counter() - clock
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60,
                     env=env).stdout.strip())
    before = _listing(site)

    here = tmp_path / "empty"
    here.mkdir()
    # a fresh Prefect home (its database is created on the way); the temporary API server's 20 s start-up
    # limit is too short for that on a loaded 2-core machine (seen: "Timed out while attempting to connect")
    env.update({"VALUEGATE_HOME": str(valuegate_home()), "PREFECT_HOME": str(tmp_path / "prefect-home"),
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"})
    clock = time.perf_counter()
    proc = _run([str(venv / "bin" / "valuegate"), "run", "--quiet"], 1800, cwd=here, env=env)
    timings["run"] = time.perf_counter() - clock

    assert "release demo/v0001 is current" in proc.stdout, proc.stdout
    current = here / "valuegate-workspace" / "releases" / "demo" / "CURRENT"
    assert current.read_text().split()[0] == "v0001"
    assert (here / "valuegate-workspace" / "releases" / "demo" / "v0001").is_dir()
    # the most common shape of instruction data, as its authors ship it (one indented JSON array of
    # instruction/input/output): `valuegate init` writes the config, `valuegate run` releases it
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    _alpaca(mine / "data" / "train.json", 16)
    _alpaca(mine / "data" / "valid.json", 6, offset=100)
    clock = time.perf_counter()
    init = _run([str(venv / "bin" / "valuegate"), "init", "data/train.json", "data/valid.json", "--out", "vg.toml"],
                300, cwd=mine, env=env)
    assert "instruction/input/output" in init.stdout + init.stderr, init.stdout + init.stderr
    proc = _run([str(venv / "bin" / "valuegate"), "run", "--config", "vg.toml", "--select.policy", "keep_all",
                 "--quiet"], 1800, cwd=mine, env=env)
    timings["alpaca"] = time.perf_counter() - clock
    print("wall seconds:", {k: round(v, 1) for k, v in timings.items()})
    assert "release train/v0001 is current" in proc.stdout, proc.stdout
    assert (mine / "valuegate-workspace" / "releases" / "train" / "CURRENT").read_text().split()[0] == "v0001"

    after = _listing(site)
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not added and not changed and after.keys() == before.keys(), (added, changed)
