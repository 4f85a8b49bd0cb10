"""The ``Store`` interface (storage/store.py, issue 30 item 3): what the steps and the table modules need from a
workspace. LanceDB's ``Workspace`` implements it, and every method called on a ``Store`` in ``tasks/`` and
``storage/`` is one the interface lists, so a second backend knows what to implement."""

from __future__ import annotations

import ast
from pathlib import Path

from valuegate.storage.lance import Workspace
from valuegate.storage.store import Store, open_store

REPO = Path(__file__).resolve().parents[2]


def _members() -> set[str]:
    return {n for n in vars(Store) if not n.startswith("_")}


def _store_calls(path: Path) -> list[tuple[int, str]]:
    """(line, attribute) of every attribute read on a name annotated ``Store`` or bound to ``open_store(...)``."""
    out = []
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = {a.arg for a in [*fn.args.args, *fn.args.kwonlyargs]
                 if a.annotation is not None and ast.unparse(a.annotation) in ("Store", "Store | None")}
        for node in ast.walk(fn):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and ast.unparse(node.value.func) == "open_store"):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        out += [(node.lineno, node.attr) for node in ast.walk(fn)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names]
    return out


def test_the_lancedb_workspace_is_a_store(tmp_path):
    ws = open_store(str(tmp_path / "ws"))
    assert isinstance(ws, Workspace) and isinstance(ws, Store)
    assert {"read", "upsert", "append", "tag", "scan", "uri"} <= _members()
    missing = sorted(m for m in _members() if not hasattr(Workspace, m))
    assert not missing, missing


def test_the_steps_and_table_modules_call_only_what_the_store_lists():
    files = [*sorted((REPO / "tasks").glob("*.py")), *sorted((REPO / "storage").glob("*.py"))]
    seen = {p.name: _store_calls(p) for p in files}
    assert seen["samples.py"] and seen["valsets.py"] and seen["extract.py"]  # it sees the annotated modules
    bad = [f"{name}:{line} calls .{attr} on a Store" for name, calls in seen.items() for line, attr in calls
           if attr not in _members()]
    assert not bad, "\n".join(bad)


def test_a_toy_store_is_a_store():
    """Structural: whatever has the methods is a Store (what a second backend writes), nothing to inherit."""

    class Toy:
        uri = "mem://toy"
        storage_options = None

    for name in _members() - {"uri", "storage_options"}:
        setattr(Toy, name, lambda self, *a, **k: None)
    assert isinstance(Toy(), Store) and not isinstance(object(), Store)
