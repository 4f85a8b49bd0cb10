"""Fault injection for the scale-out tests: inert unless ``$VALUEGATE_TEST_FAULT`` names a spec file.

The spec (JSON) says which shard, counted in the order shards start across every process, commits part of
its rows and then dies for real::

    {"at_shard": 2, "kill": [-4242]}

The shard numbered ``at_shard`` commits the first half of its ids, writes ``<spec>.killed`` (its pid and
the ids it committed), sends ``SIGKILL`` to every pid in ``kill`` (a negative number: a whole process
group, e.g. a cluster's scheduler or its workers) and then to its own process. Nothing is mocked: the
worker process is gone with a shard half written, as after an out-of-memory kill or a lost machine.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

FAULT_ENV = "VALUEGATE_TEST_FAULT"


def _claim_slot(spec_path: str) -> int:
    """The number of this shard start (0, 1, ...), claimed by creating ``<spec>.start.<n>`` exclusively."""
    for n in itertools.count():
        try:
            os.close(os.open(f"{spec_path}.start.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            continue
    raise AssertionError("unreachable")  # pragma: no cover


def shard_fault(ids: list[str], commit_part: Callable[[list[str]], object]) -> None:
    """Called at the start of a shard; kills the process half-way through the chosen one (see module doc)."""
    spec_path = os.environ.get(FAULT_ENV)
    if not spec_path:
        return
    spec = json.loads(Path(spec_path).read_text())
    if _claim_slot(spec_path) != int(spec.get("at_shard", 0)):
        return
    part = list(ids[: max(1, len(ids) // 2)])
    commit_part(part)
    Path(f"{spec_path}.killed").write_text(json.dumps({"pid": os.getpid(), "ids": part}))
    for target in spec.get("kill", []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(target), signal.SIGKILL) if int(target) > 0 else os.killpg(-int(target), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
