"""The storage of the result cache: a record is read only if it is the project's plain JSON.

Prefect reads a cached record with whatever serializer the record's own metadata names: ``pickle`` unpickles
(a ``__reduce__`` payload runs), a ``json`` serializer may name its own ``jsonlib`` or ``object_decoder``
(``subprocess.Popen`` runs a command), and even the default JSON decoder imports and calls what a
``{"__class__": ...}`` object names (``subprocess.run``). Whoever can write ``<workspace>/.prefect-results``
could run code as whoever runs valuegate next. So every read of a record goes through
:class:`TrustedLocalFileSystem`, which hands Prefect only records whose serializer is exactly Prefect's
default JSON serializer (what ``result_serializer="json"`` writes) and whose payload, parsed as plain JSON,
holds no object Prefect's decoder would import (``__class__``, ``__exc_type__``; the steps return plain JSON).
Anything else is refused with a warning: Prefect's ``exists`` is then False, so the step runs again and
its result overwrites the record (a cache miss, never code).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect.filesystems import LocalFileSystem

DECODER_KEYS = ("__class__", "__exc_type__")


class UntrustedRecord(ValueError):
    """A cached record that is not the project's plain JSON (it is never deserialized)."""


def _plain_json_serializer() -> dict[str, Any]:
    from prefect.serializers import JSONSerializer

    return JSONSerializer().model_dump(mode="json")


def _names_a_decoder_object(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if any(k in v for k in DECODER_KEYS):
                return True
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def refusal(content: bytes) -> str | None:
    """Why a stored record must not be deserialized, or None when it is the project's plain JSON.

    Args:
        content: the record's bytes as stored (Prefect's ``{"metadata": {...}, "result": "<json text>"}``).
    """
    try:
        record = json.loads(content)
    except ValueError:
        return "not JSON"
    if not isinstance(record, dict) or not isinstance(record.get("metadata"), dict):
        return "no record metadata"
    serializer = record["metadata"].get("serializer")
    if serializer != _plain_json_serializer():
        kind = serializer.get("type") if isinstance(serializer, dict) else serializer
        return f"serializer {kind!r} is not the plain JSON serializer ({json.dumps(serializer)[:200]})"
    if not isinstance(record.get("result"), str):
        return "payload is not JSON text"
    try:
        payload = json.loads(record["result"])
    except ValueError:
        return "payload is not JSON"
    if _names_a_decoder_object(payload):
        return f"payload names an object to import ({' or '.join(DECODER_KEYS)})"
    return None


def _warn(message: str) -> None:
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # no run context (e.g. read outside a flow)
        logging.getLogger("valuegate").warning(message)


class TrustedLocalFileSystem(LocalFileSystem):
    """:class:`~prefect.filesystems.LocalFileSystem` whose reads pass only :func:`refusal`-free records;
    another record raises :class:`UntrustedRecord` (Prefect's ``ResultStore.exists`` turns that into False,
    a cache miss). Writes are Prefect's own."""

    _block_type_name = "valuegate trusted results"

    def _checked(self, path: str, content: bytes) -> bytes:
        why = refusal(content)
        if why is None:
            return content
        message = (f"valuegate: cached result {self._resolve_path(path)} is not a plain JSON record ({why}); "
                   "it was not read, and the step runs again")
        _warn(message)
        raise UntrustedRecord(message)

    async def aread_path(self, path: str) -> bytes:
        return self._checked(path, await super().aread_path(path))

    def read_path(self, path: str, **kwargs: Any) -> bytes:  # Prefect passes _sync=True
        return self._checked(path, super().read_path(path, _sync=True))


def results_storage(where: str | Path) -> TrustedLocalFileSystem:
    """The result storage of the cached steps and the resume record under ``where`` (a local folder)."""
    return TrustedLocalFileSystem(basepath=str(where))
