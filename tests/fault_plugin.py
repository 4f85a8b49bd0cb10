"""Fault injection for the scale-out tests: a shard that commits half of its rows and then dies for real.

Test-only: nothing under ``tasks/`` knows about it. The :func:`fault_spec` fixture writes a spec file, sets
``$VALUEGATE_TEST_FAULT`` to it and puts ``tests/fault_hook`` first on ``PYTHONPATH``. Python processes
started from then on (the Dask worker processes of a test's cluster inherit the environment) import
``tests/fault_hook/sitecustomize.py`` at start-up, which calls :func:`patch_on_import`: when the process
imports ``valuegate.tasks.extract``, its ``extract_shard`` (what the ``extract-shard`` task calls on a
worker) is wrapped by :func:`with_fault`. The test's own process is not patched.

The spec (JSON) says which shard, counted in the order shards start across every process, commits part of
its rows and then dies::

    {"at_shard": 2, "kill": [-4242]}

The shard numbered ``at_shard`` commits the first half of its ids (through the real ``extract_shard``),
writes ``<spec>.killed`` (its pid and the ids it committed), sends ``SIGKILL`` to every pid in ``kill`` (a
negative number: a whole process group, e.g. a cluster's scheduler or its workers) and then to its own
process. Nothing is mocked: the worker process is gone with a shard half written, as after an
out-of-memory kill or a lost machine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import json
import os
import signal
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

FAULT_ENV = "VALUEGATE_TEST_FAULT"
HOOK_DIR = Path(__file__).resolve().parent / "fault_hook"  # holds the sitecustomize.py workers import
TARGET = "valuegate.tasks.extract"


def _claim_slot(spec_path: str) -> int:
    """The number of this shard start (0, 1, ...), claimed by creating ``<spec>.start.<n>`` exclusively."""
    for n in itertools.count():
        try:
            os.close(os.open(f"{spec_path}.start.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            continue
    raise AssertionError("unreachable")  # pragma: no cover


def with_fault(extract_shard: Callable[..., dict], spec_path: str) -> Callable[..., dict]:
    """``extract_shard`` that kills its process half-way through the shard the spec names (module doc)."""

    @functools.wraps(extract_shard)
    def wrapped(workspace: str, ids: list[str], *args: Any, **kwargs: Any) -> dict:
        spec = json.loads(Path(spec_path).read_text())
        if _claim_slot(spec_path) != int(spec.get("at_shard", 0)):
            return extract_shard(workspace, ids, *args, **kwargs)
        part = list(ids[: max(1, len(ids) // 2)])
        extract_shard(workspace, part, *args, **kwargs)  # commits the first half
        Path(f"{spec_path}.killed").write_text(json.dumps({"pid": os.getpid(), "ids": part}))
        for target in spec.get("kill", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(target), signal.SIGKILL) if int(target) > 0 else os.killpg(-int(target), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapped


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then the fault wrapped around ``extract_shard``."""

    def __init__(self, inner: importlib.abc.Loader, spec_path: str) -> None:
        self.inner, self.spec_path = inner, spec_path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)
        module.extract_shard = with_fault(module.extract_shard, self.spec_path)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self.inner, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds :data:`TARGET` with the other finders and hands it a :class:`_PatchingLoader` (once)."""

    def __init__(self, spec_path: str) -> None:
        self.spec_path = spec_path

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self.spec_path)
        return spec


def patch_on_import() -> None:
    """In this process, wrap ``extract_shard`` once ``valuegate.tasks.extract`` is imported (inert unless
    ``$VALUEGATE_TEST_FAULT`` is set)."""
    spec_path = os.environ.get(FAULT_ENV)
    if not spec_path:
        return
    if TARGET in sys.modules:
        module = sys.modules[TARGET]
        module.extract_shard = with_fault(module.extract_shard, spec_path)
    else:
        sys.meta_path.insert(0, _PatchOnImport(spec_path))


@pytest.fixture
def fault_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The path of the spec file (write the spec into it before the shards start): ``$VALUEGATE_TEST_FAULT``
    names it and ``PYTHONPATH`` starts with :data:`HOOK_DIR`, for every process started from now on (set
    them before a cluster starts: its workers inherit them)."""
    path = tmp_path / "fault.json"
    monkeypatch.setenv(FAULT_ENV, str(path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(HOOK_DIR), os.environ.get("PYTHONPATH"))
                                                     if p))
    return path
