"""The layout ordinary tools can read (issue 30, item 2).

``flows/``, ``tasks/`` and ``storage/`` sit at the top of the checkout and import as ``valuegate.flows``,
``valuegate.tasks`` and ``valuegate.storage`` through symbolic links inside ``valuegate/``, so that every tool
resolves an import to its file: Python from any checkout, an editable install, mypy.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINKED = {"flows": REPO / "flows", "tasks": REPO / "tasks", "storage": REPO / "storage", "demo": REPO / "infra" / "demo"}


@pytest.mark.parametrize("room", ["flows", "tasks", "storage"])
def test_every_module_of_a_room_imports_from_this_checkout(room):
    for path in sorted(LINKED[room].glob("*.py")):
        name = f"valuegate.{room}" if path.stem == "__init__" else f"valuegate.{room}.{path.stem}"
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve() == path.resolve(), name


def test_the_links_point_at_the_top_level_folders():
    for room, target in LINKED.items():
        link = REPO / "valuegate" / room
        assert link.is_symlink(), f"valuegate/{room} is not a symbolic link"
        assert link.resolve() == target.resolve(), f"valuegate/{room} → {link.resolve()}"


def test_a_second_checkout_runs_its_own_rooms(tmp_path):
    """Two checkouts sharing one environment (the one that installed valuegate editable is this one): code run
    in the other resolves ``valuegate.tasks`` to the other's tasks/, never this checkout's."""
    other = tmp_path / "other"
    for folder in ("valuegate", "flows", "tasks", "storage", "infra"):
        shutil.copytree(REPO / folder, other / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    probe = ("import valuegate, valuegate.tasks.score as s, valuegate.storage.scores as t, valuegate.flows as f;"
             "print(valuegate.__file__); print(s.__file__); print(t.__file__); print(f.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=other, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert len(out) == 4
    for file in out:
        assert Path(file).is_relative_to(other), f"{file} is not in the second checkout {other}"


@pytest.mark.slow
def test_mypy_finds_every_import():
    """``mypy -p valuegate`` (settings in pyproject.toml) resolves every import of the tree: no
    ``import-not-found`` and no untyped library it was not told about."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if mypy is None:
        pytest.fail("mypy is not installed (pip install -e '.[dev]')")
    done = subprocess.run([mypy, "-p", "valuegate", "--cache-dir", str(REPO / ".mypy_cache")], cwd=REPO,
                          capture_output=True, text=True)
    lines = (done.stdout + done.stderr).splitlines()
    assert any(line.startswith(("Found ", "Success")) for line in lines), "\n".join(lines[-20:])
    missing = [line for line in lines if "[import-not-found]" in line or "[import-untyped]" in line]
    assert not missing, "\n".join(missing)
