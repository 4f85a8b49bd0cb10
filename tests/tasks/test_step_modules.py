"""One room per DAG step (issue 17, docs/ARCHITECTURE.md §1): every step the flows name has the module of
that name in ``tasks/`` (``-`` → ``_``) with a plain ``run``, and nothing else in ``tasks/`` is a module.
Checked on the source (no Prefect run)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the Dask/Ray path's shard and plan helpers live in the module of the step they serve
HELPERS = {"plan-shards": "extract", "extract-shard": "extract", "plan-scores": "score", "score-shard": "score"}


def _task_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "task":
                    names += [kw.value.value for kw in dec.keywords if kw.arg == "name"]
    return names


def test_every_step_has_its_module_with_a_run():
    steps = [n for f in ("refresh.py", "validation.py") for n in _task_names(REPO / "flows" / f)]
    assert {"ingest", "validation-set", "extract", "score", "select", "allocate", "gate", "release", "report",
            "promote"} <= set(steps), steps
    for step in steps:
        module = HELPERS.get(step, step.replace("-", "_"))
        assert (REPO / "tasks" / f"{module}.py").is_file(), f"step {step!r}: no tasks/{module}.py"
        if step not in HELPERS:
            assert callable(getattr(importlib.import_module(f"valuegate.tasks.{module}"), "run", None)), step


def test_nothing_else_in_tasks_is_a_module():
    steps = {n for f in ("refresh.py", "validation.py") for n in _task_names(REPO / "flows" / f)}
    modules = {HELPERS.get(s, s.replace("-", "_")) for s in steps}
    extra = sorted(p.stem for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__" and p.stem not in modules)
    assert not extra, f"tasks/ holds modules that are no step: {extra}"
