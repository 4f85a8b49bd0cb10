"""The ``allocate`` step: the release version this run writes, claimed for this run, and the records that
let a re-run with the same inputs resume it (docs/ARCHITECTURE.md §1).

Three things keep a version to one live run and make a failed run resumable:

* the *claim*: an exclusive, non-blocking ``flock`` on ``<results>/release-claims/<name>-<version>.lock``
  (``<results>``: :func:`valuegate.flows.results_dir`). The kernel drops it when the process dies (SIGKILL
  included), so a version is free exactly when the run that worked on it is gone or done;
* the *resume record*: right after allocating, the version is recorded under the release key (everything
  the release is cut from) in the flow's result store; the flow clears it once the run promoted;
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from prefect.results import ResultStore
from prefect.serializers import JSONSerializer

from valuegate.digests import sha256_path
from valuegate.flows import digest, results_dir
from valuegate.flows.trusted_results import results_storage
from valuegate.settings import Settings
from valuegate.storage import releases as store
from valuegate.storage.store import open_store

# only the steps after scoring run this module: it stays out of the cached steps' code fingerprint
# (valuegate.flows.after_scoring)
AFTER_SCORING = True

__all__ = ["AllocateResult", "claim", "current_release", "pending_release", "release_inputs", "release_key",
           "remember_release", "run", "unchanged_release", "unclaim"]


@dataclass(frozen=True)
class AllocateResult:
    """What :func:`run` did.

    Attributes:
        version (str): the version this run writes (``vNNNN``), claimed for this run.
        resumed (bool): whether it is the version a failed run with the same inputs left.
        cleaned (tuple[str, ...]): abandoned incomplete versions emptied down to their ``.allocated`` marker.
        warnings (tuple[str, ...]): what went wrong without stopping the run (one line each).
    """

    version: str
    resumed: bool
    cleaned: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# the resume record of a release
# --------------------------------------------------------------------------------------------------


def _pending_store(settings: Settings) -> ResultStore | None:
    where = results_dir(settings.workspace)
    if where is None:
        return None
    return ResultStore(result_storage=results_storage(where), serializer=JSONSerializer(),
                       cache_result_in_memory=False)


def pending_release(settings: Settings, key: str) -> str | None:
    """The version a failed run with the same release key left unpromoted, if any."""
    records = _pending_store(settings)
    if records is None or not records.exists(key):
        return None
    return records.read(key).result


def remember_release(settings: Settings, key: str, version: str | None) -> str | None:
    """Record (or, with None, clear) the version this run works on, for a re-run with the same key should
    this one not finish.

    Best effort: a record that cannot be written costs a re-run a new version, never the run's own error.

    Returns:
        None, or the warning (one line) when the record could not be written.
    """
    records = _pending_store(settings)
    if records is None:
        return None
    try:
        records.write(version, key=key)
    except Exception as exc:  # e.g. a full disk: keep the error that made the run fail
        return f"could not record release {version} for a resuming run: {exc}"
    return None


# --------------------------------------------------------------------------------------------------
# the claim of a version
# --------------------------------------------------------------------------------------------------

_CLAIMS: dict[str, int] = {}  # claim file → open descriptor holding its flock, for this process's runs
# (workspace, release name, version) → its claim file: unclaim finds it without the workspace (whose id names
# the results folder), so a run whose object store stopped answering still lets go of its version
_CLAIMED: dict[tuple[str, str, str], str] = {}
_CLAIMS_LOCK = threading.Lock()


def _claim_file(settings: Settings, version: str) -> Path | None:
    where = results_dir(settings.workspace)
    return None if where is None else where / "release-claims" / f"{settings.release.name}-{version}.lock"


def claim(settings: Settings, version: str) -> bool:
    """Hold ``version`` for this run until :func:`unclaim`: an exclusive, non-blocking ``flock`` on its
    claim file beside the resume records.

    Returns:
        False when another run (of this or another process on this machine) holds it.
    """
    path = _claim_file(settings, version)
    if path is None:
        return True
    try:
        import fcntl
    except ImportError:  # no flock (Windows): resuming cannot tell a live run from a dead one
        return True
    with _CLAIMS_LOCK:
        if str(path) in _CLAIMS:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        _CLAIMS[str(path)] = fd
        _CLAIMED[(str(settings.workspace), settings.release.name, version)] = str(path)
        return True


def unclaim(settings: Settings, version: str) -> None:
    """Let go of a version :func:`claim` held (closing the descriptor drops the ``flock``). Reads nothing from
    the workspace."""
    with _CLAIMS_LOCK:
        path = _CLAIMED.pop((str(settings.workspace), settings.release.name, version), None)
        fd = _CLAIMS.pop(path, None) if path is not None else None
    if fd is not None:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------------


def run(settings: Settings, resume: str | None, run_id: str, release_key: str) -> AllocateResult:
    """The version this run writes, claimed for this run (:func:`claim`).

    ``resume`` (the version a run with the same inputs allocated and did not finish) is taken when it is
    still there, not current, either incomplete or cut from ``run_id``, and no live run holds it; else a
    new version (exclusive allocation: concurrent runs never share one), recorded under ``release_key`` at
    once, so that a run killed at any later point is resumed by the next run with the same inputs. First
    empties the versions other runs left incomplete and no live run claims
    (:func:`valuegate.storage.releases.clean_abandoned`; a failure there is a warning).
    """
    root, name = open_store(settings.workspace), settings.release.name
    claims = {"claim": lambda v: claim(settings, v), "unclaim": lambda v: unclaim(settings, v)}
    # claimed first, then checked: a run that held it lets go only once it is done (promoted or failed), so what
    # is read under the claim cannot change (checked before, a run promoting in between was taken over)
    resumed = False
    if resume and claim(settings, resume):
        resumed = (store.version_exists(root, name, resume) and store.read_current(root, name) != resume
                   and (not store.release_exists(root, name, resume)
                        or store.read_manifest(root, name, resume).get("run_id") == run_id))
        if not resumed:
            unclaim(settings, resume)
    warnings: list[str] = []
    cleaned: list[str] = []
    try:  # versions killed or failed runs left incomplete (their claims free): emptied to their marker
        cleaned = list(store.clean_abandoned(root, name, keep=[resume] if resumed else [], **claims,
                                             warn=warnings.append))  # a symbolic link: named, left alone
    except Exception as exc:  # e.g. a permission error: the run goes on, the next one tries again
        warnings.append(f"could not clean abandoned release versions of {name}: {exc}")
    if resumed:
        return AllocateResult(str(resume), True, tuple(cleaned), tuple(warnings))
    version = store.allocate_version(root, name, **claims)  # claimed before its marker exists
    warning = remember_release(settings, release_key, version)
    return AllocateResult(version, False, tuple(cleaned), tuple(warnings + ([warning] if warning else [])))


# --------------------------------------------------------------------------------------------------
# what the release is cut from, and the key a resuming run finds it under
# --------------------------------------------------------------------------------------------------


def release_inputs(settings: Settings) -> list[dict[str, str]]:
    """The run's source files as the manifest records them: ``{"source": absolute path, "sha256": of its
    bytes}`` (a folder of shards or a glob: one entry per file)."""
    from valuegate.inputs.readers import source_files

    return [{"source": str(Path(f).resolve()), "sha256": sha256_path(f)}
            for s in settings.data.sources for f in source_files(s)]


def current_release(settings: Settings) -> str | None:
    """The version of ``settings.release.name`` that is current (None: none is)."""
    return store.read_current(open_store(settings.workspace), settings.release.name)


def unchanged_release(settings: Settings, previous: str | None, run_id: str,
                      inputs: list[dict[str, str]]) -> tuple[dict, str] | None:
    """The manifest of the current release and where its report is, when this run would cut the very same
    release from it: the same
    scores run (same data, validation version, model and scoring settings), the same source files and every
    other setting the same; else None (a new release is written).

    An unchanged re-run then says "nothing changed since vN" instead of writing a copy."""
    if previous is None:
        return None
    root = open_store(settings.workspace)
    try:
        manifest = store.read_manifest(root, settings.release.name, previous)
    except (OSError, ValueError):
        return None
    same = (manifest.get("run_id") == run_id and manifest.get("inputs") == inputs
            and manifest.get("settings") == json.loads(settings.model_dump_json())
            and (manifest.get("gate") or {}).get("passed") is True)
    return (manifest, f"{store.release_uri(root, settings.release.name, previous)}/report.html") if same else None


def release_key(settings: Settings, previous: str | None, run_id: str, inputs: list[dict[str, str]]) -> str:
    """The key of the resume record: everything the release is cut from (the workspace, the release that was
    current, the scores run, the inputs' hashes and every setting)."""
    ws = settings.workspace
    root = open_store(ws).uri if "://" in ws and not ws.startswith("file://") else str(Path(ws).resolve())
    return "pending-release-" + digest(root, settings.release.name, previous, run_id, inputs,
                                       json.loads(settings.model_dump_json()))
