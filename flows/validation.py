"""Validation sets as a flow: register a file as the next version of a named set
(``register-validation-set``).

The task :func:`register_validation_version` is also the ``validation-set`` step of the refresh DAG, so a
refresh and a registration share one code path (and one cache).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from valuegate.digests import sha256_path
from valuegate.errors import ValuegateError
from valuegate.flows import KeyedOn, code_fingerprint, persisted
from valuegate.flows.user_errors import retry_unless_user_error
from valuegate.settings import load_settings
from valuegate.storage import schemas
from valuegate.storage.versions import table_versions, workspace_uri
from valuegate.tasks import validation_set


def _valset_key(params: dict[str, Any]) -> dict[str, Any]:
    """What :func:`register_validation_version` returns depends on: the file's bytes (not its name alone),
    the reference, the reader's limit, and the registry as it stands (any registration or pruning moves
    its table version, so a registry change is never answered from the cache)."""
    file = params.get("file")
    return {"workspace": workspace_uri(params["workspace"]), "ref": params["ref"], "max_chars": params["max_chars"],
            "fields": params.get("fields") or {},
            "file": [str(Path(file).resolve()), sha256_path(file)] if file else None,
            "registry": table_versions(params["workspace"], [schemas.VALSET_VERSIONS]), "code": code_fingerprint()}


@task(name="validation-set", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error,
      cache_policy=KeyedOn(parts=_valset_key), result_serializer="json")
def register_validation_version(workspace: str, ref: str, file: str | None, max_chars: int,
                                fields: dict[str, str] | None = None) -> dict[str, Any]:
    """Register ``file`` as the next version of the set ``ref`` names and pin the version to use
    (:func:`valuegate.tasks.validation_set.run`; ``fields``: the column mapping, ``data.fields``).

    Retried: every step is workspace I/O, and registering identical content twice is a no-op; a user
    error (a bad or missing file) is not retried.

    Returns:
        :class:`~valuegate.tasks.validation_set.ValidationSetResult` as a dict: ``valset`` (``name@vN``),
        ``name``, ``version``, ``rows``, ``content_hash``, ``source`` (the file the version was registered
        from) and ``new`` (whether this call registered a new version).
    """
    res = validation_set.run(workspace, ref, file, max_chars, fields)
    get_run_logger().info(res.line())
    return dataclasses.asdict(res)


@flow(name="register-validation-set", log_prints=True)
def register_validation_set(name: str, file: str, workspace: str | None = None,
                            config: str | None = None) -> dict[str, Any]:
    """Register ``file`` as the next version of validation set ``name`` (a no-op for identical content).

    Parameters are small references: a set name, a file path, a workspace (default: the config's, else
    ``$VALUEGATE_WORKSPACE``, else ``./valuegate-workspace``), a config path.

    Returns:
        ``valset`` (``name@vN``), ``rows``, ``new`` (False: the content was registered before and that
        version is returned), ``content_hash``, ``source``, ``seconds``.

    Raises:
        ValuegateError: ``name`` is a reference (``NAME@vN``) or not a valid name, the file cannot be read,
            is empty, or has a row a validation set cannot hold.
    """
    if "@" in name:
        raise ValuegateError(f"register {name!r}: give the set's NAME; the version is allocated")
    settings = load_settings(config, {"workspace": workspace} if workspace else None)
    t0 = time.perf_counter()
    rec = persisted(register_validation_version, settings.workspace)(
        settings.workspace, name, str(file), settings.ingest.max_chars, settings.data.fields)
    seconds = round(time.perf_counter() - t0, 3)
    what = "registered as a new version" if rec["new"] else "unchanged content: already registered"
    lines = [f"# validation set {rec['valset']}", "", what, "", "| field | value |", "|---|---|",
             f"| version | {rec['valset']} |", f"| rows | {rec['rows']} |",
             f"| content | `{rec['content_hash'][:16]}` |", f"| source | {rec['source']} |",
             f"| seconds | {seconds} |"]
    create_markdown_artifact(key="validation-set", markdown="\n".join(lines),
                             description=f"registration of {file} as {rec['valset']}")
    return {"valset": rec["valset"], "rows": rec["rows"], "new": rec["new"],
            "content_hash": rec["content_hash"], "source": rec["source"], "seconds": seconds}


__all__ = ["register_validation_set", "register_validation_version"]
