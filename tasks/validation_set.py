"""The ``validation-set`` step: register a validation file as the next version of a named set and pin the
version a run scores against (``flows/validation.py`` wraps :func:`run`); the set's rows as samples."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from valuegate.engine.sample import Sample
from valuegate.errors import ValuegateError
from valuegate.inputs.identity import sample_from_record, sample_id, sample_record
from valuegate.inputs.verdicts import read_source_rows
from valuegate.names import check_name
from valuegate.storage import schemas
from valuegate.storage import valsets as store
from valuegate.storage.images import store_sample_images
from valuegate.storage.metadata import encode_metadata
from valuegate.storage.store import Store, open_store


def valset_rows(path: str | Path, max_chars: int, fields: dict[str, str] | None = None) -> pa.Table:
    """Read a validation file into ``valset_schema`` rows; a validation set must be clean.

    Raises:
        ValuegateError: any refused row (naming file, row and field) or an empty file.
    """
    verdicts = read_source_rows(path, max_chars, fields)
    bad = [v for v in verdicts if v.sample is None]
    if bad:
        raise ValuegateError(f"{path}: row {bad[0].row}: {bad[0].reason} (a validation set must have no "
                             f"refused row; {len(bad)} refused)")
    if not verdicts:
        raise ValuegateError(f"{path}: the validation set is empty")
    rows = []
    for v in verdicts:
        rec = sample_record(v.sample)
        rows.append({"id": sample_id(rec), **rec, "row": v.row,
                     "metadata": json.dumps(encode_metadata(v.extra, v.types), ensure_ascii=False, sort_keys=True)})
    return pa.Table.from_pylist(rows, schema=schemas.valset_schema)


def content_hash(rows: pa.Table) -> str:
    """sha256 over the ordered sample ids and metadata: identical content ⇔ identical hash."""
    h = hashlib.sha256()
    for sid, meta in zip(rows["id"].to_pylist(), rows["metadata"].to_pylist(), strict=True):
        h.update(sid.encode())
        h.update((meta or "").encode())
    return h.hexdigest()


# How long a registration waits for the record of another run that tagged the same version (seconds).
_REGISTER_WAIT_S = 60


def register_valset(ws: Store, name: str, path: str | Path, max_chars: int,
                    fields: dict[str, str] | None = None) -> tuple[dict, bool]:
    """Register ``path`` as the next version of ``name`` (``fields``: the column mapping, ``data.fields``).

    Returns:
        the version record and whether it is new (False: identical content was registered before, and
        that version is returned).
    """
    check_name(name, "validation set")
    rows = valset_rows(path, max_chars, fields)
    if any(rows["images"].to_pylist()):  # image-text validation samples: their images, by content hash
        store_sample_images(ws, [v.sample for v in read_source_rows(path, max_chars, fields)])
    digest = content_hash(rows)
    deadline = time.monotonic() + _REGISTER_WAIT_S
    while True:
        for r in store.read_valset_versions(ws, name):
            if r["content_hash"] == digest and not r["pruned"]:
                return r, False
        try:
            return store.write_valset_version(ws, name, rows, digest, str(Path(path).resolve())), True
        except store.VersionTaken as exc:  # another run registers now: wait for its record, then look again
            if time.monotonic() > deadline:
                raise ValuegateError(f"{exc}, and its record did not appear within {_REGISTER_WAIT_S} s "
                                     "(a crashed registration leaves its tag: delete it to go on)") from exc
            time.sleep(0.5)


def valset_samples(rows: pa.Table) -> tuple[list[str], list[Sample]]:
    """Ids and samples of a validation set's rows, in row order."""
    recs = rows.sort_by("row").to_pylist()
    return [r["id"] for r in recs], [sample_from_record(r, r["row"], "valset") for r in recs]


# --------------------------------------------------------------------------------------------------
# The ``validation-set`` step of the refresh DAG (and of the ``register-validation-set`` flow)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationSetResult:
    """The pinned validation version (:func:`run`); plain JSON once ``dataclasses.asdict``-ed.

    Attributes:
        valset (str): ``name@vN``.
        name (str): the set's name. version (int): N.
        rows (int): its rows.
        content_hash (str): sha256 over its ordered ids and metadata (:func:`content_hash`).
        source (str): the file the version was registered from.
        new (bool): whether this call registered a new version.
    """

    valset: str
    name: str
    version: int
    rows: int
    content_hash: str
    source: str
    new: bool

    def line(self) -> str:
        """One human line."""
        return ("registered " if self.new else "using ") + f"{self.valset} ({self.rows} rows)"


def run(workspace: str, ref: str, file: str | None, max_chars: int,
        fields: dict[str, str] | None = None) -> ValidationSetResult:
    """Register ``file`` as the next version of the set ``ref`` names (identical content: a no-op that
    returns the version registered before), then pin the version to use: ``ref``'s own version when it
    names one (``NAME@vN``), else the registered one, else (no file) the latest.

    Raises:
        ValuegateError: a bad or missing file, an unknown set or version.
    """
    ws = open_store(workspace)
    name, pinned = store.parse_ref(ref)
    new = False
    if file:
        rec, new = register_valset(ws, name, file, max_chars, fields)
        ref = ref if pinned is not None else f"{name}@v{rec['version']}"
    rec, _ = store.read_valset(ws, ref)
    return ValidationSetResult(f"{rec['name']}@v{rec['version']}", rec["name"], int(rec["version"]), int(rec["rows"]),
                               rec["content_hash"], rec["source"], new)
