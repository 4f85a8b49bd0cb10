"""``valuegate verify``: check every table and every release of a workspace, and repair what can be derived
again (issue 26).

* **tables**: every table is read whole, every column of every row (:meth:`Store.scan`), and each
  tagged version of a validation set too. A table that cannot be read is damaged. The derived tables,
  ``features__<fp>``, ``feature_sets`` and ``scores``, are computed from the samples by a run: repairing
  drops a damaged one, so the next run extracts / scores again what it needs (releases keep their own copy
  of the scores they were cut from). ``samples``, ``members``, ``ingests``, ``quarantine``, ``images`` and
  the validation sets are the workspace's own record of its inputs: they are reported, never rewritten.
* **releases**: each complete release's ``manifest.json`` must parse, ``data.parquet`` and
  ``scores.parquet`` must match the sha256 the manifest records and every file it lists must be there;
  ``CURRENT`` must name a complete release. A damaged release is reported and left exactly as it is
  (releases are immutable); an incomplete version (no manifest) is not a release and is only counted;
  a symbolic link is named and never followed.

Nothing here writes but :func:`repair` (``Store.drop`` of the damaged derived tables).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from valuegate.errors import DamagedTable, ValuegateError
from valuegate.names import is_valid_name
from valuegate.storage import releases as rstore
from valuegate.storage import schemas
from valuegate.storage.failures import short_reason
from valuegate.storage.objstore import open_root
from valuegate.storage.store import Store

__all__ = ["Finding", "check_releases", "check_tables", "is_derived", "repair"]

_VERSION = re.compile(r"^v\d{4,}$")


@dataclass(frozen=True)
class Finding:
    """One thing checked.

    Attributes:
        kind (str): ``"table"`` or ``"release"``.
        name (str): the table (``features__ab12``), or the release (``r/v0003``, ``r/CURRENT``).
        problem (str | None): what is damaged (one line), None when it is sound.
        detail (str): what was checked (``"1200 rows"``, ``"3 files"``).
    """

    kind: str
    name: str
    problem: str | None = None
    detail: str = ""

    @property
    def damaged(self) -> bool:
        return self.problem is not None

    @property
    def derived(self) -> bool:
        """A table a run computes again from the samples (features, feature sets, scores)."""
        return self.kind == "table" and is_derived(self.name)


def is_derived(table: str) -> bool:
    """Whether a run derives ``table`` again from the samples (so dropping it loses nothing for good)."""
    return table.startswith(schemas.FEATURES_PREFIX) or table in (schemas.SCORES, schemas.FEATURE_SETS)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_tables(ws: Store) -> list[Finding]:
    """Read every table of ``ws`` whole (and each tagged version of a validation set); one finding each."""
    out = []
    for name in ws.table_names():
        try:
            rows = ws.scan(name)
            detail = f"{rows} rows"
            if name.startswith(schemas.VALSET_PREFIX):
                tags = ws.tags(name)
                for tag in sorted(tags):
                    ws.scan(name, version=tag)
                detail += f", {len(tags)} tagged versions"
            out.append(Finding("table", name, None, detail))
        except Exception as exc:  # DamagedTable, or anything else Lance says about its files
            cause = exc.__cause__ if isinstance(exc, DamagedTable) and exc.__cause__ is not None else exc
            out.append(Finding("table", name, short_reason(cause)))
    return out


def check_releases(root: Any) -> list[Finding]:
    """Check every complete release under ``<root>/releases`` against its manifest, and each ``CURRENT``."""
    r = open_root(root)
    out = []
    for name in r.list("releases"):
        base = f"releases/{name}"
        if r.is_local and r.path(base).is_symlink():
            out.append(Finding("release", name, f"{r.path(base)} is a symbolic link: not followed"))
            continue
        if not is_valid_name(name):
            continue
        incomplete = 0
        for entry in r.list(base):
            if not _VERSION.match(entry):
                continue
            label = f"{name}/{entry}"
            if r.is_local and r.path(f"{base}/{entry}").is_symlink():
                out.append(Finding("release", label, f"{r.path(f'{base}/{entry}')} is a symbolic link: not followed"))
                continue
            if not r.is_file(f"{base}/{entry}/{rstore.MANIFEST_FILE}"):
                incomplete += 1
                continue
            out.append(_check_release(r, name, entry))
        current = rstore.read_current(r, name)
        if current is not None and not rstore.release_exists(r, name, current):
            out.append(Finding("release", f"{name}/CURRENT", f"CURRENT names {current}, which is not a complete "
                                                             "release"))
        elif current is not None:
            out.append(Finding("release", f"{name}/CURRENT", None, f"current {current}"
                               + (f"; {incomplete} incomplete versions (not releases)" if incomplete else "")))
    return out


def _check_release(r: Any, name: str, version: str) -> Finding:
    label = f"{name}/{version}"
    vkey = f"releases/{name}/{version}"
    try:
        manifest = json.loads(r.read_bytes(f"{vkey}/{rstore.MANIFEST_FILE}") or b"")
    except ValueError as exc:
        return Finding("release", label, f"manifest.json is not valid JSON ({_one_line(exc)})")
    checked = 0
    for file, key in ((rstore.DATA_FILE, "data_sha256"), (rstore.SCORES_FILE, "scores_sha256")):
        want = manifest.get(key)
        if want is None:
            continue
        if not r.is_file(f"{vkey}/{file}"):
            return Finding("release", label, f"{file} is missing")
        try:
            got = r.sha256(f"{vkey}/{file}")
        except (OSError, ValuegateError) as exc:
            return Finding("release", label, f"{file} cannot be read ({_one_line(exc)})")
        if got != want:
            return Finding("release", label, f"{file} does not match the sha256 of its manifest")
        checked += 1
    missing = [f for f in manifest.get("files", []) if not (r.is_file(f"{vkey}/{f}") or r.exists_prefix(f"{vkey}/{f}"))]
    if missing:
        return Finding("release", label, f"files of its manifest are missing: {', '.join(missing)}")
    return Finding("release", label, None, f"{checked} checksums, {len(manifest.get('files', []))} files")


def repair(ws: Store, findings: list[Finding]) -> list[str]:
    """Drop each damaged derived table (features, feature sets, scores), so the next run derives it again;
    returns the tables dropped. Nothing else is ever changed."""
    dropped = []
    for f in findings:
        if f.damaged and f.derived:
            if ws.uri and "://" not in ws.uri:
                open_root(ws.uri).write_path(f"{f.name}.lance")  # never through a symbolic link
            ws.drop(f.name)
            dropped.append(f.name)
    return dropped
