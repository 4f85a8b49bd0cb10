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


def test_a_step_after_scoring_says_so_in_its_own_module(tmp_path):
    """Issue 30: a new post-scoring step is one file (``AFTER_SCORING = True`` in it) plus its registration in
    the flow; no list in flows/ names it. A toy step module is picked up: editing it leaves the cached steps'
    code fingerprint as it was, while editing a module that does not declare it changes the fingerprint."""
    from valuegate.flows import after_scoring, fingerprint_of

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "score.py").write_text("def run(settings):\n    return 1\n")
    toy = tasks / "toy_step.py"
    toy.write_text('"""A toy step after scoring."""\n\nAFTER_SCORING = True\n\n\ndef run(settings):\n    return 1\n')
    before = fingerprint_of([("tasks", [tasks])])
    toy.write_text(toy.read_text() + "\n\ndef more():\n    return 2\n")
    assert after_scoring(toy) and fingerprint_of([("tasks", [tasks])]) == before
    (tasks / "score.py").write_text("def run(settings):\n    return 2\n")
    assert fingerprint_of([("tasks", [tasks])]) != before
    # a mention that is not the top-level declaration (False, a comment, a nested name) does not count
    for text in ("AFTER_SCORING = False\n", "# AFTER_SCORING = True\n", "def f():\n    AFTER_SCORING = True\n"):
        toy.write_text(text)
        assert not after_scoring(toy), text
    # the steps after scoring and what only they use declare it (no hidden list in flows/__init__.py)
    declared = {f"{p.parent.name}/{p.name}" for room in ("tasks", "storage", "valuegate/engine")
                for p in (REPO / room).glob("*.py") if after_scoring(p)}
    assert declared == {"tasks/select.py", "tasks/allocate.py", "tasks/gate.py", "tasks/release.py",
                        "tasks/report.py", "tasks/promote.py", "engine/explain.py", "storage/releases.py"}


def test_the_code_fingerprint_covers_the_row_checks(monkeypatch, tmp_path):
    """The readers, row checks and sample ids (valuegate/inputs/) decide what ingest keeps and under which id:
    a change there must not reuse a cached ingest or extraction. The fingerprint reads every room's files."""
    import valuegate.inputs
    from valuegate import flows

    copy = tmp_path / "inputs"
    copy.mkdir()
    for p in Path(valuegate.inputs.__path__[0]).glob("*.py"):
        (copy / p.name).write_text(p.read_text())
    flows.code_fingerprint.cache_clear()
    monkeypatch.setattr(valuegate.inputs, "__path__", [str(copy)])
    before = flows.code_fingerprint()
    (copy / "rows.py").write_text((copy / "rows.py").read_text() + "\n# a changed row check\n")
    flows.code_fingerprint.cache_clear()
    try:
        assert flows.code_fingerprint() != before
    finally:
        flows.code_fingerprint.cache_clear()
