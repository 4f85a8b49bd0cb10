"""valuegate.flows: the Prefect flows (docs/ARCHITECTURE.md §1) and the orchestration policy they share.

Cached steps persist their results under ``<workspace>/.prefect-results`` (so the cache goes with the
workspace and a wiped workspace never meets an old cache; an object-store workspace keeps them in a local
folder keyed by the workspace's id, see :func:`results_dir`), keyed by :class:`KeyedOn`: the task's source,
plus what the step's result depends on, including the state of the workspace tables it reads where that
matters. A key that cannot be computed turns caching off for that call (the step runs), never on. A record
is read back only if it is the project's plain JSON (:mod:`valuegate.flows.trusted_results`): a planted
pickle record, or one whose serializer or payload would import code, is a cache miss, never executed.
``PREFECT_TASKS_REFRESH_CACHE=true`` recomputes every cached step once and overwrites its record.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CachePolicy

from valuegate.flows.trusted_results import results_storage

RESULTS_DIR = ".prefect-results"


def results_dir(workspace: str) -> Path | None:
    """Where cached results of a workspace persist (absolute).

    A local workspace: ``<workspace>/.prefect-results``. An object-store workspace: a local folder of the
    process that runs the flow, ``$VALUEGATE_RESULTS_DIR`` (else ``$VALUEGATE_HOME/prefect-results``, else
    ``~/.cache/valuegate/prefect-results``) ``/<workspace id>``, where the workspace id is a random id
    the workspace stores once (``<workspace>/.valuegate-workspace-id``): a wiped and recreated workspace
    never meets an old cache, and two workspaces never share one. Only the flow's own process reads and
    writes it (the cached steps and the resume record run there; cluster workers run uncached shards), so
    no worker needs it; a flow started on another machine starts with an empty cache (it recomputes the
    cached steps once: ingestion and scoring find their work already in the workspace).
    """
    uri = workspace[len("file://"):] if workspace.startswith("file://") else workspace
    if "://" in uri:
        from valuegate.storage.objstore import workspace_id

        base = os.environ.get("VALUEGATE_RESULTS_DIR")
        if base:
            where = Path(base).expanduser()
        else:
            from valuegate.home import valuegate_home

            where = valuegate_home() / "prefect-results"
        return (where / workspace_id(uri)).resolve()
    return Path(uri).expanduser().resolve() / RESULTS_DIR


# what the cached record of ``extract`` (ExtractResult) and of ``score`` (ScoreResult) holds, and no other
# step's record does: the answers that name derived tables (features, scores)
_DERIVED_RESULT_KEYS = (b'train_fp', b'run_id')


def forget_derived_results(workspace: str) -> int:
    """Remove the cached answers of ``extract`` and ``score`` (and ``plan-scores``) of ``workspace``, so
    that the next run extracts and scores again once ``valuegate verify`` dropped a damaged features or
    scores table (their cache keys do not read the tables). Other records (ingest, validation set, the
    resume records and claims in sub-folders) stay. Never follows a symbolic link. Returns the records
    removed."""
    where = results_dir(workspace)
    if where is None or not where.is_dir() or where.is_symlink():
        return 0
    removed = 0
    for path in where.iterdir():
        if path.is_symlink() or not path.is_file():
            continue
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if any(key in raw for key in _DERIVED_RESULT_KEYS):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def persisted(task: Any, workspace: str) -> Any:
    """``task`` with its results persisted under :func:`results_dir` (what caching and resuming read back),
    read back only when they are the project's plain JSON (:mod:`valuegate.flows.trusted_results`)."""
    where = results_dir(workspace)
    if where is None:
        return task.with_options(cache_policy=NO_CACHE, persist_result=False)
    out = task.with_options(result_storage=where, persist_result=True)
    # Prefect would read ``where`` through a plain LocalFileSystem; the same block, unsaved as that one is,
    # but reading only trusted records (Task() accepts a block only once saved on the server, so it is set
    # after construction; ResultStore.update_for_task uses a block instance as it is)
    out.result_storage = results_storage(where)
    return out


def digest(*parts: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``parts`` (sorted keys; non-JSON values by ``str``)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


#: The name a module of ``tasks/``, ``storage/`` or ``valuegate/engine/`` that only the steps after scoring run
#: (selection, allocation, gate, release, report and its explanations, promotion) sets to True at its top level
#: (``AFTER_SCORING = True``): editing it cannot change what a cached step computed, so it stays out of their
#: code fingerprint. Read from the source (:func:`after_scoring`), never by importing the module.
AFTER_SCORING = "AFTER_SCORING"


def after_scoring(path: Path) -> bool:
    """Whether the module at ``path`` declares ``AFTER_SCORING = True`` at its top level."""
    source = path.read_bytes()
    if AFTER_SCORING.encode() not in source:
        return False
    for node in ast.parse(source, str(path)).body:
        targets = (node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign)
                   else [])
        if any(isinstance(t, ast.Name) and t.id == AFTER_SCORING for t in targets):
            return isinstance(node.value, ast.Constant) and node.value.value is True
    return False


def fingerprint_of(rooms: Iterable[tuple[str, Iterable[Path]]]) -> str:
    """sha256 over the modules of each ``(room, folders)``: every ``*.py`` (its room-relative name and its
    bytes, in name order) but those declaring :data:`AFTER_SCORING`."""
    h = hashlib.sha256()
    for room, folders in rooms:
        for path in sorted(Path(p) for d in folders for p in Path(d).glob("*.py")):
            if after_scoring(path):
                continue
            h.update(f"{room}/{path.name}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the source files of ``valuegate.tasks``, ``valuegate.storage``, ``valuegate.engine`` (the
    scoring math) and ``valuegate.inputs`` (the readers and row checks that decide what ingest keeps and each
    sample's id) but the modules declaring ``AFTER_SCORING = True`` (:func:`fingerprint_of`): a cached result
    is never reused by code that would compute it differently (a new module counts unless it says it runs
    after scoring)."""
    import valuegate.engine
    import valuegate.inputs
    import valuegate.storage
    import valuegate.tasks

    return fingerprint_of((room, pkg.__path__) for room, pkg in (
        ("tasks", valuegate.tasks), ("storage", valuegate.storage), ("engine", valuegate.engine),
        ("inputs", valuegate.inputs)))


def files_stat(path: str | None) -> list[tuple[str, int, int]] | None:
    """(relative name, size, mtime ns) of every file under a local directory, sorted; None when ``path`` is
    not a local directory (a hub id). Cheap, and a rewritten file changes it."""
    if not path or not Path(path).is_dir():
        return None
    root = Path(path).resolve()
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            st = (Path(dirpath) / n).stat()
            out.append((str((Path(dirpath) / n).relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(out)


@dataclass
class KeyedOn(CachePolicy):
    """Cache key = the task's source + ``parts(parameters)``: everything its result depends on.

    ``parts`` raising, or returning None, turns caching off for that call (unlike a compound of Prefect
    policies, which would drop the missing part and key on the rest).
    """

    parts: Callable[[dict[str, Any]], Any] | None = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        if self.parts is None:
            return None
        try:
            parts = self.parts(inputs)
            source = TASK_SOURCE.compute_key(task_ctx, inputs, flow_parameters)
        except Exception:  # e.g. a missing source file: the step runs and says so itself
            return None
        if parts is None or source is None:
            return None
        return digest(source, parts)
