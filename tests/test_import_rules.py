"""The rooms' import rules (docs/ARCHITECTURE.md §2), checked on the source, so a change that breaks
one fails here rather than in a reader's head.

- ``valuegate/engine/`` (the math and the model side) imports no Prefect, LanceDB, pyarrow or
  Great Expectations, nothing of ``tasks/``, ``storage/`` or ``flows/``, and installs nothing (no subprocess,
  no zip files);
- no room's modules import each other in a cycle;
- ``storage/`` imports no torch (nor transformers/peft), directly or through what it imports;
- ``valuegate/inputs/`` (reading the files people have) imports no torch, LanceDB, Prefect, settings, and
  nothing of ``tasks/``, ``storage/`` or ``flows/``; of the engine only the sample type and the image checks;
- ``flows/`` (wiring) writes no table: it imports no LanceDB/pyarrow, calls no write method of the
  workspace and imports no writing function of ``storage/``; table I/O goes through ``tasks/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = {"engine": REPO / "valuegate" / "engine", "storage": REPO / "storage", "flows": REPO / "flows",
         "tasks": REPO / "tasks", "inputs": REPO / "valuegate" / "inputs"}

ENGINE_FORBIDDEN = ("prefect", "lancedb", "pyarrow", "great_expectations", "dask", "ray",
                    "valuegate.storage", "valuegate.tasks", "valuegate.flows",
                    # installing the default model (pip, wheels as zip files) is valuegate/default_model.py's
                    "subprocess", "zipfile")
STORAGE_FORBIDDEN = ("torch", "transformers", "peft", "valuegate.tasks", "valuegate.flows")
# the engine modules that are plain names or numpy (no torch), which the store may share: the column names,
# the sample type, the stored form of the sparse rows (int8 steps, feature format 6), and the baseline registry
# (the scores schema has a column per registered baseline) with the built-in baselines it imports
STORAGE_MAY_USE_ENGINE = ("valuegate.engine.columns", "valuegate.engine.sample", "valuegate.engine.quantize",
                          "valuegate.engine.baseline_registry", "valuegate.engine.cheap_baselines")
INPUTS_FORBIDDEN = ("torch", "transformers", "lancedb", "prefect", "dask", "ray", "great_expectations",
                    "valuegate.storage", "valuegate.tasks", "valuegate.flows", "valuegate.settings")
INPUTS_MAY_USE_ENGINE = ("valuegate.engine.sample", "valuegate.engine.images")
FLOWS_FORBIDDEN = ("lancedb", "pyarrow", "valuegate.storage.lance")
# the write API of the workspace (storage/lance.py: Workspace) and of LanceDB whose names say so (flows/ cannot
# build a workspace: it may not import storage/lance.py) and the prefixes of storage's writing functions
WRITE_METHODS = {"overwrite", "upsert", "add_null_columns", "delete_tag", "merge_insert",
                 "create_table", "create_scalar_index", "write_parquet", "write_table"}
WRITE_PREFIXES = ("write", "stage", "complete", "promote", "register", "allocate", "clean", "ensure", "insert",
                  "append", "delete", "record", "remember")


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every import of a file, function-local ones included: (line, module, imported names)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def _hits(module: str, names: list[str], forbidden: tuple[str, ...]) -> bool:
    full = [module, *(f"{module}.{n}" for n in names)]
    return any(m == f or m.startswith(f + ".") for m in full for f in forbidden)


def _files(room: str) -> list[Path]:
    return sorted(ROOMS[room].glob("*.py"))


def test_the_rooms_exist():
    for room, path in ROOMS.items():
        assert _files(room), f"{room}: no modules at {path}"


def test_the_engine_imports_no_pipeline():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files("engine")
           for line, mod, names in _imports(p) if _hits(mod, names, ENGINE_FORBIDDEN)]
    assert not bad, "\n".join(bad)


def test_storage_imports_no_torch():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files("storage")
           for line, mod, names in _imports(p)
           if _hits(mod, names, STORAGE_FORBIDDEN)
           or (_hits(mod, names, ("valuegate.engine",)) and not _hits(mod, names, STORAGE_MAY_USE_ENGINE))]
    assert not bad, "\n".join(bad)


def test_storage_pulls_no_torch_in_at_import():
    modules = [f"valuegate.storage.{p.stem}" for p in _files("storage") if p.stem != "__init__"]
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_inputs_read_files_and_nothing_else():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files("inputs")
           for line, mod, names in _imports(p)
           if _hits(mod, names, INPUTS_FORBIDDEN)
           or (_hits(mod, names, ("valuegate.engine",)) and not _hits(mod, names, INPUTS_MAY_USE_ENGINE))]
    assert not bad, "\n".join(bad)


def _write_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITE_METHODS:
            found.append(f"{path.relative_to(REPO)}:{node.lineno} calls {ast.unparse(node.func)}()")
    return found


def test_flows_write_no_table():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files("flows")
           for line, mod, names in _imports(p) if _hits(mod, names, FLOWS_FORBIDDEN)]
    bad += [f"{p.relative_to(REPO)}:{line} imports {mod}.{n} (a writer of storage/)" for p in _files("flows")
            for line, mod, names in _imports(p) if mod.startswith("valuegate.storage")
            for n in names if n.lower().startswith(WRITE_PREFIXES)]
    bad += [hit for p in _files("flows") for hit in _write_calls(p)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("room", ["tasks", "flows", "engine", "inputs"])
def test_nothing_outside_storage_imports_lancedb(room):
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files(room)
           for line, mod, names in _imports(p) if _hits(mod, names, ("lancedb",))]
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module → modules it imports), or [] when there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


@pytest.mark.parametrize("room", ["engine", "inputs", "storage", "tasks"])
def test_no_import_cycle_in_a_room(room):
    """A room's modules import each other in one direction (function-local imports included): no module has
    to be read before itself (e.g. the model loader and the vision-language processor)."""
    package = {"engine": "valuegate.engine", "inputs": "valuegate.inputs", "storage": "valuegate.storage",
               "tasks": "valuegate.tasks"}[room]
    mods = {p.stem: p for p in _files(room) if p.stem != "__init__"}
    graph = {stem: {mod.rsplit(".", 1)[-1] for _, mod, _ in _imports(p)
                    if mod.startswith(package + ".") and mod.rsplit(".", 1)[-1] in mods} - {stem}
             for stem, p in mods.items()}
    assert not _cycle(graph), " → ".join(_cycle(graph))


# the steps not yet on the Store interface: none since score.py and ingest.py moved (issue 30 item 3); keep it empty
TASKS_STILL_ON_LANCE: set[str] = set()


def test_tasks_reach_the_workspace_through_the_store_interface():
    """tasks/ open a workspace with ``storage.store.open_store`` and annotate ``Store``; the LanceDB
    implementation (``storage/lance.py``: ``Workspace``) is storage's own business."""
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _files("tasks")
           for line, mod, names in _imports(p)
           if p.name not in TASKS_STILL_ON_LANCE and _hits(mod, names, ("valuegate.storage.lance.Workspace",))]
    assert not bad, "\n".join(bad)
    still = {p.name for p in _files("tasks") for _, mod, names in _imports(p)
             if _hits(mod, names, ("valuegate.storage.lance.Workspace",))}
    assert still <= TASKS_STILL_ON_LANCE, still
