"""Release layout and atomic promotion (docs/ARCHITECTURE.md §3.3), on local disk or an S3-compatible store.

Layout, under the workspace root (a directory, or the workspace's ``s3://bucket/prefix``)::

    <root>/releases/<name>/
        CURRENT                 first line: the version that is current (absent: none yet); second line:
                                ``promotion <n>``, the number of promotions so far (every promotion
                                writes a new n, so no two CURRENT contents are ever the same)
        README.md               written by each promotion: a dataset card whose only config is the
                                current version's data.parquet, so ``datasets.load_dataset(<this
                                folder>)`` loads the current release (locally under CURRENT's lock; on
                                S3 right after the compare-and-swap, from CURRENT read back)
        v0001/                  one release (versions allocated exclusively, never reused)
            .allocated          the allocation marker (created only if absent)
            data.parquet        the kept training rows: plain Arrow columns (no extension, dictionary,
                                view or large-offset types, no polars metadata), so polars and
                                ``datasets.load_dataset("parquet", data_files=...)`` read it as is;
                                at least ``id`` (str, unique) and ``value`` (float, the value the
                                selection policy read)
            scores.parquet      optional: every sample scored by the run, ``id``, ``value``, ``kept``
                                (bool), ``suspect`` when the run computed it, and the other columns
                                of the scores given (the per-signal columns, the drop ``reason``);
                                what :func:`valuegate.tasks.release.diff_releases` reads to say why
                                an id entered or left
            <extra>             optional files/folders copied in (the gate's Data Docs, report.html)
            manifest.json       written last, after every other file (the report included): the
                                completion record (a release without it is incomplete, is not listed,
                                cannot be read or promoted, and can never become current)

Every file access goes through :class:`valuegate.storage.objstore.Root`; the protocol is the same on both
kinds of root, only the primitives differ:

* **version allocation**: one past the highest version listed, claimed by creating ``<version>/.allocated``
  only if absent (locally ``O_EXCL``; on S3 ``PUT`` with ``If-None-Match: *``, a lost race is ``412``);
  the loser re-lists and tries the next number. Concurrent runs never share a version.
* **files**: locally a temporary name, fsync, ``os.replace``, fsync of the directory; on S3 a single
  ``PUT`` (or a completed multipart upload), which readers see whole or not at all. ``manifest.json``
  goes last, carrying the sha256 of ``data.parquet`` (and of ``scores.parquet``) and the names of the
  other files. A release is written in two calls, :func:`stage_release` (data, scores, Data Docs) and
  :func:`complete_release` (the last files, e.g. the report rendered from the record in memory, then the
  manifest), or in one, :func:`write_release`. A crash at any point leaves either a complete release or
  a version without manifest, which everything here ignores (not listed, not readable, not promotable);
  staging and completing the same version again, whatever the crash left, completes it.
* **CURRENT** is a read-modify-write of one object, made linearisable: locally under an ``flock`` of
  ``.CURRENT.lock`` with the write itself a temporary file + ``os.replace``; on S3 a compare-and-swap:
  ``GET`` returns the content and its ETag, the new content is ``PUT`` with ``If-Match: <etag>``
  (``If-None-Match: *`` when there is no CURRENT yet), and a ``412`` (another promoter won) re-reads and
  retries. A reader does one ``GET`` of one object, so it sees the old version or the new one, never a
  torn one, and only ever a complete release whose gate passed (:func:`promote` checks both before
  moving). Each promotion returns exactly the version it replaced and numbers itself (``promotion n``):
  concurrent promoters are serialised, none is lost, and the content never repeats (no ABA on ETags).
  An ordinary promotion never moves CURRENT backwards: promoting a version older than the current one
  raises :class:`NewerIsCurrent` and leaves CURRENT as it is, so runs that finish out of order end on
  the newest release; going back is the explicit ``promote(..., backwards=True)`` of a rollback.

This module never imports torch or LanceDB.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from valuegate.errors import ValuegateError
from valuegate.names import check_name, is_valid_name
from valuegate.storage import retry
from valuegate.storage.objstore import Root, open_root

# only the steps after scoring run this module: it stays out of the cached steps' code fingerprint
# (valuegate.flows.after_scoring)
AFTER_SCORING = True

__all__ = [
    "CURRENT_FILE",
    "DATA_FILE",
    "MANIFEST_FILE",
    "SCORES_FILE",
    "NewerIsCurrent",
    "allocate_version",
    "clean_abandoned",
    "complete_release",
    "format_version",
    "list_release_names",
    "list_releases",
    "parse_version",
    "promote",
    "read_current",
    "read_current_record",
    "read_manifest",
    "read_release_data",
    "read_release_scores",
    "release_dir",
    "release_exists",
    "release_scores_exist",
    "release_uri",
    "releases_uri",
    "stage_release",
    "version_exists",
    "write_release",
    "write_release_file",
]

DATA_FILE = "data.parquet"
SCORES_FILE = "scores.parquet"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
CURRENT_CARD = "README.md"  # beside CURRENT: datasets.load_dataset(releases/<name>) reads the current release
ALLOCATED_FILE = ".allocated"
_LOCK_FILE = ".CURRENT.lock"
_RESERVED = {DATA_FILE, SCORES_FILE, MANIFEST_FILE, CURRENT_FILE}

_VERSION = re.compile(r"^v(\d{4,})$")
_STAGING = re.compile(r"^\.(v\d{4,})-[A-Za-z0-9_]+$")  # .v0003-gate, .v0003-report: local staging folders
ABANDONED_AFTER_S = 3600.0  # object store: an incomplete version this long untouched counts as abandoned
_ALLOCATE_ATTEMPTS = 1000
log = logging.getLogger(__name__)


def _root(root: Any) -> Root:
    """The workspace root: a local directory, an ``s3://`` URI (options from the environment) or a
    :class:`~valuegate.storage.lance.Workspace` (its own storage options)."""
    return open_root(root)


def _remove_temporaries(r: Root, key: str) -> None:
    """Local: remove the leftovers of a crashed write (dot-prefixed ``*.tmp`` entries) in a release
    directory (an object store has none: a PUT that did not complete leaves nothing)."""
    if not r.is_local:
        return
    import shutil

    directory = r.write_path(key)
    for entry in os.listdir(directory):
        if entry.startswith(".") and entry.endswith(".tmp"):
            p = directory / entry
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Names, versions, paths
# --------------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    return check_name(name, "release")  # the one rule for names (valuegate.names)


def format_version(number: int) -> str:
    """Version string of a release number: ``1`` → ``"v0001"`` (more digits past 9999)."""
    if number < 1:
        raise ValuegateError(f"release numbers start at 1, got {number}")
    return f"v{number:04d}"


def parse_version(version: str | int) -> int:
    """Release number of a version: ``"v0003"``, ``"v3"``, ``"3"`` or ``3`` → ``3``.

    Raises:
        ValuegateError: not a version.
    """
    if isinstance(version, int) and not isinstance(version, bool):
        number = version
    else:
        text = str(version).strip()
        digits = text[1:] if text[:1] in ("v", "V") else text
        if not digits.isdigit():
            raise ValuegateError(f"release version {version!r}: expected vNNNN (e.g. v0003) or a number")
        number = int(digits)
    if number < 1:
        raise ValuegateError(f"release version {version!r}: numbers start at 1")
    return number


def _canonical(version: str | int) -> str:
    return format_version(parse_version(version))


def _base(name: str) -> str:
    return f"releases/{_check_name(name)}"


def _vkey(name: str, version: str | int, file: str | None = None) -> str:
    key = f"{_base(name)}/{_canonical(version)}"
    return f"{key}/{file}" if file else key


def releases_uri(root: Any, name: str) -> str:
    """Where the releases of ``name`` live: ``<root>/releases/<name>`` (a local path or an s3:// URI)."""
    return _root(root).uri_of(_base(name))


def release_uri(root: Any, name: str, version: str | int) -> str:
    """Where one release lives: ``<root>/releases/<name>/<version>`` (local path or s3:// URI)."""
    return _root(root).uri_of(_vkey(name, version))


def release_dir(root: Any, name: str, version: str | int) -> Path:
    """Local directory of one release (``version`` normalised to vNNNN).

    Raises:
        ValuegateError: an object-store root (use :func:`release_uri`).
    """
    r = _root(root)
    if not r.is_local:
        raise ValuegateError(f"releases of {r.uri} are on an object store, not in a local directory; "
                             "use release_uri")
    return r.path(_vkey(name, version))


def _version_numbers(r: Root, name: str) -> list[int]:
    """Release numbers of every version under the release name (complete or not), ascending."""
    return sorted(int(m.group(1)) for e in r.list(_base(name)) if (m := _VERSION.match(e)))


def version_exists(root: Any, name: str, version: str | int) -> bool:
    """Whether ``version`` was allocated (or written), complete or not."""
    return _root(root).exists_prefix(_vkey(name, version))


# --------------------------------------------------------------------------------------------------
# Allocation and writing
# --------------------------------------------------------------------------------------------------


def allocate_version(root: Any, name: str, *, claim: Callable[[str], bool] | None = None,
                     unclaim: Callable[[str], None] | None = None) -> str:
    """Reserve the next version of ``name`` by creating its ``.allocated`` marker only if absent.

    Takes one past the highest existing version and creates ``<version>/.allocated`` exclusively (``O_EXCL``
    locally, ``If-None-Match: *`` on S3); when another run claimed it first, re-lists and tries the next
    number. Two runs on one workspace therefore never get the same version. Numbers are never reused: a
    run that crashed before its manifest leaves a gap (its version stays, incomplete and ignored, until
    :func:`clean_abandoned` empties it down to its marker, which stays).

    Args:
        root: workspace root (directory, s3:// URI or Workspace).
        name: release name (letters, digits, ``.``, ``_``, ``-``).
        claim: ``claim(version) -> bool``, take the caller's claim on a version (False: another run holds
            it). Taken *before* the marker is created, so the version is never visible unclaimed to
            :func:`clean_abandoned`; a number whose claim is held is skipped.
        unclaim: ``unclaim(version)``, drop a claim taken for a number another run created first.

    Returns:
        the reserved version, e.g. ``"v0003"``.

    Raises:
        ValuegateError: bad name, or no version could be reserved after many tries.
    """
    r = _root(root)
    _check_name(name)
    number = max(_version_numbers(r, name), default=0) + 1
    # Not a retry: every pass claims a different number (the next one past what is there), so the loop
    # always progresses and never waits; the bound only stops a runaway.
    for _ in range(_ALLOCATE_ATTEMPTS):
        # locally an existing directory without marker (written by an older valuegate) counts as taken
        taken = r.is_local and r.path(_vkey(name, number)).exists() and not r.is_file(
            _vkey(name, number, ALLOCATED_FILE))
        if not taken and (claim is None or claim(format_version(number))):
            if r.create(_vkey(name, number, ALLOCATED_FILE), b""):
                return format_version(number)
            if claim is not None and unclaim is not None:
                unclaim(format_version(number))
        number = max([number, *_version_numbers(r, name)]) + 1
    raise ValuegateError(f"could not reserve a release version under {r.uri_of(_base(name))} after "
                         f"{_ALLOCATE_ATTEMPTS} tries; is something else creating versions there?")


def clean_abandoned(root: Any, name: str, *, keep: Iterable[str] = (),
                    claim: Callable[[str], bool] | None = None, unclaim: Callable[[str], None] | None = None,
                    min_age_s: float | None = None, warn: Callable[[str], None] | None = None) -> list[str]:
    """Empty the versions of ``name`` that killed or failed runs left incomplete, down to their
    ``.allocated`` marker (which keeps the number taken: numbers are never reused), and remove their hidden
    staging folders (``.vNNNN-gate``, ``.vNNNN-report`` beside the versions, local roots only).

    A version is abandoned when it has no manifest (or, complete, still has a staging folder), is not in
    ``keep`` (the version being resumed) and its run is gone: ``claim(version)`` succeeds (the claim is held
    while its files are removed, so a run cannot resume it meanwhile, and dropped after with ``unclaim``).
    A version that holds nothing but its marker has nothing to clean. Complete releases are never touched.

    On an object store the claim lock (a local ``flock``) says nothing about runs on other machines, so
    there a version is cleaned only when, besides, its newest object is at least ``min_age_s`` old
    (default :data:`ABANDONED_AFTER_S`, one hour, by the objects' last-modified times): a run on another
    machine that takes longer than that between two writes of its release could lose its staged files
    (its completion then fails with "stage the release again", it never completes a damaged release).
    Locally ``min_age_s`` defaults to no age rule: without ``claim`` every incomplete version not in
    ``keep`` counts as abandoned, so callers that write releases without claims must pass ``keep``.

    Args:
        root: workspace root (directory, s3:// URI or Workspace).
        name: release name.
        keep: versions never cleaned (e.g. the one this run resumes).
        claim: ``claim(version) -> bool``: take the version's claim, False when a live run holds it.
        unclaim: ``unclaim(version)``: drop a claim ``claim`` took.
        min_age_s: the age rule (seconds); None: an hour on an object store, none locally.
        warn: ``warn(line)`` for each symbolic link met (default: a logged warning). A link is never a
            version: the link (a version, a staging folder, a file in a version, or ``releases/<name>``
            itself) is named once and left alone, and nothing is removed through it.

    Returns:
        the versions something was removed from, ascending (``["v0002", ...]``); empty when nothing was.
    """
    r = _root(root)
    base = _base(name)
    kept = {_canonical(v) for v in keep}
    warn = warn or log.warning
    links: set[str] = set()
    if r.is_local:
        link = r.link_in(base)
        if link is not None:
            warn(f"{link} is a symbolic link, not a release folder: left alone (no version cleaned through it)")
            return []
        links = {e for e in r.list(base, hidden=True) if r.path(f"{base}/{e}").is_symlink()}
        for entry in sorted(links):
            warn(f"{r.path(f'{base}/{entry}')} is a symbolic link, not a release version: left alone")
    staging: dict[str, list[str]] = {}
    for entry in (r.list(base, hidden=True) if r.is_local else []):
        if (m := _STAGING.match(entry)) and _VERSION.match(m.group(1)) and entry not in links:
            staging.setdefault(_canonical(m.group(1)), []).append(entry)
    incomplete = {format_version(n) for n in _version_numbers(r, name)
                  if format_version(n) not in links and not r.is_file(_vkey(name, n, MANIFEST_FILE))}
    age = min_age_s if min_age_s is not None else (None if r.is_local else ABANDONED_AFTER_S)
    cleaned = []
    for version in sorted(incomplete | set(staging), key=parse_version):
        if version in kept:
            continue
        files = _version_files(r, name, version, warn) if version in incomplete else []
        if not files and not staging.get(version):
            continue  # the marker only: nothing to clean
        if age is not None and not r.is_local and files and time.time() - max(t for _, t in files) < age:
            continue  # maybe a live run on another machine
        if claim is not None and not claim(version):
            continue  # a live run holds it
        try:
            if not release_exists(r, name, version):  # completed by its run in the meantime: keep its files
                for key, _ in files:
                    _remove_local(r.write_path(key)) if r.is_local else r.delete(key)
            for entry in staging.get(version, []):
                _remove_local(r.write_path(f"{base}/{entry}"))
        finally:
            if claim is not None and unclaim is not None:
                unclaim(version)
        cleaned.append(version)
    return cleaned


def _version_files(r: Root, name: str, version: str,
                   warn: Callable[[str], None] = log.warning) -> list[tuple[str, float]]:
    """(key, last-modified epoch seconds) of everything in a version but its ``.allocated`` marker: the
    top-level entries locally (a folder is one entry; a symbolic link is named with ``warn`` and left
    out), every object on an object store."""
    vkey = _vkey(name, version)
    if r.is_local:
        directory = r.path(vkey)
        if directory.is_symlink():
            return []
        try:
            entries = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        for e in sorted(e for e in entries if (directory / e).is_symlink()):
            warn(f"{directory / e} is a symbolic link in an incomplete release version: left alone")
        return [(f"{vkey}/{e}", (directory / e).lstat().st_mtime) for e in entries
                if e != ALLOCATED_FILE and not (directory / e).is_symlink()]
    from pyarrow import fs as pafs

    prefix = r.uri_of(vkey)[len("s3://"):]
    infos = r.fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return [(f"{vkey}/{i.path[len(prefix) + 1:]}", i.mtime.timestamp()) for i in infos
            if i.type == pafs.FileType.File and i.path != f"{prefix}/{ALLOCATED_FILE}"]


def _remove_local(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(
        missing_ok=True)


def _plain_type(t: pa.DataType) -> pa.DataType:
    """The most widely readable equivalent of an Arrow type: 32-bit offsets (``string``, ``binary``,
    ``list``) instead of the large variants polars exports (older ``datasets`` refuse ``large_list``),
    recursively through lists, structs and maps."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(pa.field(t.value_field.name, _plain_type(t.value_type), t.value_field.nullable))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_plain_type(t.value_type), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _plain_type(f.type), f.nullable) for f in t])
    if pa.types.is_map(t):
        return pa.map_(_plain_type(t.key_type), _plain_type(t.item_type))
    return t


def _plain_table(df: pl.DataFrame, what: str) -> tuple[pa.Table, pa.Schema]:
    """A polars frame as an Arrow table and the plain schema to write it with: categoricals/enums decoded
    to strings, no view types (polars' oldest compat level), no extension types, no large offsets, no
    schema or field metadata."""
    if any(dt == pl.Object for dt in df.dtypes):
        bad = [c for c, dt in df.schema.items() if dt == pl.Object]
        raise ValuegateError(f"{what}: columns {bad} hold Python objects; convert them to plain types")
    cats = [c for c, dt in df.schema.items() if isinstance(dt, (pl.Categorical, pl.Enum))]
    if cats:
        df = df.with_columns(pl.col(cats).cast(pl.String))
    table = df.to_arrow(compat_level=pl.CompatLevel.oldest())
    fields = []
    for f in table.schema:
        if isinstance(f.type, pa.ExtensionType):
            raise ValuegateError(f"{what}: column {f.name!r} has the extension type {f.type}; "
                                 "cast it to a plain type")
        fields.append(pa.field(f.name, _plain_type(f.type), f.nullable))
    return table, pa.schema(fields)


def _check_extra_name(key: str) -> str:
    rel = Path(key)
    if (not key or rel.is_absolute() or ".." in rel.parts or rel.parts[0] in _RESERVED
            or any(p.startswith(".") for p in rel.parts)):
        raise ValuegateError(f"extra release file name {key!r}: use a relative name without '..' or a "
                             f"leading dot, other than {sorted(_RESERVED)}")
    return rel.as_posix()




def stage_release(root: Any, name: str, version: str, data: pl.DataFrame, manifest: dict[str, Any],
                  extra: dict[str, Path] | None = None, *, scores: pl.DataFrame | None = None) -> dict[str, Any]:
    """Write every file of a release but its manifest; returns the completion record to finish it with.

    Order: ``data.parquet`` → ``scores.parquet`` → the extra files/folders, each written whole (locally a
    temporary name, fsync, rename; on S3 one PUT). Idempotent on an incomplete version whatever a crash
    left there: leftover temporaries are removed and every file is written again. Nothing is visible until
    :func:`complete_release` writes the manifest.

    Args:
        root: workspace root (directory, s3:// URI or Workspace).
        name: release name.
        version: a version from :func:`allocate_version` (created if missing).
        data: the kept training rows, ``(n_kept, columns)``: at least ``id`` (str, unique) and ``value``
            (float); every other column (prompt, response, metadata...) is kept as is, as plain Arrow types.
        manifest: the release's provenance (see :func:`valuegate.tasks.release.build_manifest`); the record
            adds ``name``, ``version``, ``data_sha256`` (sha256 of the ``data.parquet`` bytes),
            ``data_rows``, ``scores_sha256`` (or None) and ``files`` (the extra names).
        extra: name inside the release → local source file or folder to copy in (e.g. ``{"gate": docs_dir}``).
        scores: every sample the run scored, at least ``id`` and ``value`` (one row per id); stored as
            ``scores.parquet`` with ``id``, ``value``, ``kept`` (= the id is in ``data``) and its other
            columns as they are. Without it,
            :func:`valuegate.tasks.release.diff_releases` cannot tell why an id entered or left.

    Returns:
        the completion record (JSON-able dict): what :func:`complete_release` writes as ``manifest.json``.

    Raises:
        ValuegateError: bad name/version, missing ``id``/``value`` columns, duplicate ids, non-plain
            column types, an extra source that does not exist, or a release that is already complete
            (releases are immutable).
    """
    name = _check_name(name)
    version = _canonical(version)
    for key in ("name", "version"):
        given = manifest.get(key)
        expected = name if key == "name" else version
        if given is not None and given != expected:
            raise ValuegateError(f"the manifest says {key} {given!r} but the release is {name}/{version}")
    for col in ("id", "value"):
        if col not in data.columns:
            raise ValuegateError(f"release data needs an {col!r} column; it has {data.columns}")
    if data["id"].n_unique() != data.height:
        raise ValuegateError("release data has duplicate ids; keep one row per sample")
    if scores is not None:
        for col in ("id", "value"):
            if col not in scores.columns:
                raise ValuegateError(f"release scores need an {col!r} column; they have {scores.columns}")
    extras = _checked_extras(extra)

    r = _root(root)
    vkey = _vkey(name, version)
    _refuse_complete(r, name, version)
    if r.is_local:
        r.path(vkey).mkdir(parents=True, exist_ok=True)
        _remove_temporaries(r, vkey)

    data_sha = r.write_parquet(f"{vkey}/{DATA_FILE}", *_plain_table(data, "release data"))
    scores_sha = None
    if scores is not None:
        measures = [pl.col(c).cast(pl.Float64) for c in ("value", "suspect") if c in scores.columns]
        rest = [c for c in scores.columns if c not in ("id", "value", "suspect", "kept")]  # per-signal columns
        kept = scores.select(pl.col("id").cast(pl.String), *measures, *rest).with_columns(
            kept=pl.col("id").is_in(data["id"].cast(pl.String).implode()))
        scores_sha = r.write_parquet(f"{vkey}/{SCORES_FILE}", *_plain_table(kept, "release scores"))
    for key, src in extras.items():
        r.copy_in(src, f"{vkey}/{key}")
    record = {**manifest, "name": name, "version": version, "data_sha256": data_sha,
              "data_rows": data.height, "scores_sha256": scores_sha, "files": sorted(extras)}
    return json.loads(json.dumps(record, default=_json_default))


def complete_release(root: Any, name: str, version: str | int, record: dict[str, Any],
                     extra: dict[str, Path] | None = None) -> str | Path:
    """Finish a release :func:`stage_release` wrote: copy in the last files (the report), check the staged
    files against the record, and write ``manifest.json`` last, as the completion record.

    A release is complete only when every file it names is written: a crash anywhere before the manifest
    leaves a version that is never listed, read or promoted, and staging it again and calling this again
    completes it.

    Args:
        root, name, version: the release (staged, not yet complete).
        record: what :func:`stage_release` returned.
        extra: name inside the release → local file or folder copied in before the manifest (e.g.
            ``{"report.html": path}``); their names join the record's ``files``.

    Returns:
        the release directory (a ``Path``) locally, its ``s3://`` URI (a string) on an object store.

    Raises:
        ValuegateError: a release already complete, a record of another release, or staged files that no
            longer match the record (stage the release again).
    """
    name = _check_name(name)
    version = _canonical(version)
    if (record.get("name"), record.get("version")) != (name, version):
        raise ValuegateError(f"the completion record is for {record.get('name')}/{record.get('version')}, "
                             f"not {name}/{version}")
    extras = _checked_extras(extra)
    r = _root(root)
    vkey = _vkey(name, version)
    _refuse_complete(r, name, version)
    for file, sha in ((DATA_FILE, record.get("data_sha256")), (SCORES_FILE, record.get("scores_sha256"))):
        if sha is not None and (not r.is_file(f"{vkey}/{file}") or r.sha256(f"{vkey}/{file}") != sha):
            raise ValuegateError(f"{r.uri_of(f'{vkey}/{file}')} is missing or does not match its record; "
                                 "stage the release again")
    for key, src in extras.items():
        r.copy_in(src, f"{vkey}/{key}")
    files = sorted({*record.get("files", []), *extras})
    missing = [f for f in files if not (r.is_file(f"{vkey}/{f}") or r.exists_prefix(f"{vkey}/{f}"))]
    if missing:
        raise ValuegateError(f"release {name}/{version} misses {missing}; stage the release again")
    payload = json.dumps({**record, "files": files}, indent=2, sort_keys=True,
                         default=_json_default).encode() + b"\n"
    _write_manifest((r, vkey), payload)
    return r.path(vkey) if r.is_local else r.uri_of(vkey)


def write_release(root: Any, name: str, version: str, data: pl.DataFrame,
                  manifest: dict[str, Any], extra: dict[str, Path] | None = None, *,
                  scores: pl.DataFrame | None = None) -> str | Path:
    """Write one whole release into its allocated version: :func:`stage_release` then
    :func:`complete_release` (``manifest.json`` last, as the completion record).

    Order: ``data.parquet`` → ``scores.parquet`` → the extra files/folders → ``manifest.json``. A crash
    before the manifest leaves an incomplete release that is never listed, read or promoted; calling this
    again on the same version completes it. Arguments as :func:`stage_release` (``extra`` e.g.
    ``{"gate": docs_dir, "report.html": report}``).

    Returns:
        the release directory (a ``Path``) locally, its ``s3://`` URI (a string) on an object store.

    Raises:
        ValuegateError: as :func:`stage_release`.
    """
    record = stage_release(root, name, version, data, manifest, extra, scores=scores)
    return complete_release(root, name, version, record)


def _checked_extras(extra: dict[str, Path] | None) -> dict[str, Path]:
    extras = {_check_extra_name(k): Path(v) for k, v in (extra or {}).items()}
    for key, src in extras.items():
        if not src.exists():
            raise ValuegateError(f"extra release file {key!r}: {src} does not exist")
    return extras


def _refuse_complete(r: Root, name: str, version: str) -> None:
    if release_exists(r, name, version):
        raise ValuegateError(f"release {name}/{version} is already complete; releases are immutable "
                             "(allocate a new version)")


def _write_manifest(where: tuple[Root, str], payload: bytes) -> None:
    """The completion record's write into release ``where`` = (root, release key); its own function so a
    test can simulate a crash just before it."""
    r, vkey = where
    r.write_atomic(f"{vkey}/{MANIFEST_FILE}", payload)


def write_release_file(root: Any, name: str, version: str | int, key: str, payload: bytes) -> str:
    """Add one file to a complete release after its manifest (the report): written whole, returns its
    local path or URI.

    Raises:
        ValuegateError: a reserved or malformed name, or a release that is not complete.
    """
    key = _check_extra_name(key)
    read_manifest(root, name, version)
    r = _root(root)
    full = _vkey(name, version, key)
    r.write_atomic(full, payload)
    return r.uri_of(full)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"manifest value of type {type(obj).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def release_exists(root: Any, name: str, version: str | int) -> bool:
    """Whether the release is complete (its ``manifest.json`` is present)."""
    return _root(root).is_file(_vkey(name, version, MANIFEST_FILE))


def read_manifest(root: Any, name: str, version: str | int) -> dict[str, Any]:
    """The manifest of a complete release.

    Raises:
        ValuegateError: the release does not exist or is incomplete (its run crashed before the manifest).
    """
    r = _root(root)
    key = _vkey(name, version, MANIFEST_FILE)
    raw = r.read_bytes(key)
    if raw is None:
        known = [m["version"] for m in list_releases(r, name)]
        raise ValuegateError(f"no complete release {name}/{_canonical(version)} "
                             f"(complete releases: {', '.join(known) or 'none'})")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValuegateError(f"{r.uri_of(key)} is not valid JSON ({exc}); the release is damaged") from exc


def read_release_data(root: Any, name: str, version: str | int,
                      columns: list[str] | None = None, verify: bool = False) -> pl.DataFrame:
    """The kept rows of a complete release, ``(n_kept, columns)``.

    Args:
        columns: read only these columns (all when None).
        verify: check the file's sha256 against the manifest's ``data_sha256`` first (reads the file twice).

    Raises:
        ValuegateError: incomplete/missing release, or a hash mismatch with ``verify``.
    """
    r = _root(root)
    manifest = read_manifest(r, name, version)
    key = _vkey(name, version, DATA_FILE)
    if verify and r.sha256(key) != manifest.get("data_sha256"):
        raise ValuegateError(f"{r.uri_of(key)} does not match the sha256 of its manifest; the release is damaged")
    return r.read_parquet(key, columns=columns)


def release_scores_exist(root: Any, name: str, version: str | int) -> bool:
    """Whether a complete release carries the scores of its run (``scores.parquet``)."""
    r = _root(root)
    return release_exists(r, name, version) and r.is_file(_vkey(name, version, SCORES_FILE))


def read_release_scores(root: Any, name: str, version: str | int) -> pl.DataFrame:
    """Every sample scored by the release's run: ``id`` (str), ``value`` (float64), ``kept`` (bool), and
    ``suspect`` (float64) when the run computed it.

    Raises:
        ValuegateError: incomplete/missing release, or one written without scores.
    """
    r = _root(root)
    read_manifest(r, name, version)
    key = _vkey(name, version, SCORES_FILE)
    if not r.is_file(key):
        raise ValuegateError(f"release {name}/{_canonical(version)} was written without the scores of its run")
    return r.read_parquet(key)


def _parse_current(raw: bytes | None) -> tuple[str | None, int]:
    """(version, promotion number) of CURRENT's bytes (an old one-line file counts as promotion 0)."""
    if raw is None:
        return None, 0
    lines = raw.decode().strip().splitlines()
    version = lines[0].strip() if lines and lines[0].strip() else None
    seq = 0
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        if key == "promotion" and value.strip().isdigit():
            seq = int(value.strip())
    return version, seq


def read_current_record(root: Any, name: str) -> dict[str, Any]:
    """``{"version": str | None, "promotion": int}``: what CURRENT names and how many promotions of
    ``name`` there have been (0 before any)."""
    version, seq = _parse_current(_root(root).read_bytes(f"{_base(name)}/{CURRENT_FILE}"))
    return {"version": version, "promotion": seq}


def read_current(root: Any, name: str) -> str | None:
    """The current version of ``name`` (what ``CURRENT`` names), or None before any promotion."""
    return read_current_record(root, name)["version"]


def list_releases(root: Any, name: str) -> list[dict[str, Any]]:
    """Manifests of every complete release of ``name``, oldest first.

    Returns:
        one manifest per release, each with ``version`` (vNNNN) and ``current`` (bool) set; incomplete
        releases (no manifest) are left out.
    """
    r = _root(root)
    current = read_current(r, name)
    out = []
    for number in _version_numbers(r, name):
        raw = r.read_bytes(_vkey(name, number, MANIFEST_FILE))
        if raw is None:
            continue
        m = json.loads(raw)
        m["version"] = format_version(number)
        m["current"] = m["version"] == current
        out.append(m)
    return out


def list_release_names(root: Any) -> list[str]:
    """Names that have at least one version under ``<root>/releases``, sorted."""
    r = _root(root)
    return [e for e in r.list("releases") if is_valid_name(e) and _version_numbers(r, e)]


# --------------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------------


def _current_payload(version: str, seq: int) -> bytes:
    return f"{version}\npromotion {seq}\n".encode()


class NewerIsCurrent(ValuegateError):
    """An ordinary promotion refused because a newer release is current (``current``: its version)."""

    def __init__(self, name: str, version: str, current: str) -> None:
        self.name, self.version, self.current = name, version, current
        super().__init__(f"release {name}/{version} not promoted: newer release {current} is current "
                         f"(to go back to it, roll back: valuegate release rollback {name} --to {version})")

    @property
    def reason(self) -> str:
        """The short form for a run's summary: ``not promoted: newer release vNNNN is current``."""
        return f"not promoted: newer release {self.current} is current"


def _check_forward(name: str, version: str, current: str | None, backwards: bool) -> None:
    if not backwards and current is not None and parse_version(current) > parse_version(version):
        raise NewerIsCurrent(name, version, current)


def current_card(name: str, version: str) -> bytes:
    """The ``README.md`` beside CURRENT: a card whose one config is ``<version>/data.parquet``, so that
    ``datasets.load_dataset(<releases/name>)`` loads the current release and nothing else (never the gate's
    Data Docs records)."""
    return (f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {version}/{DATA_FILE}\n"
            f"---\n\n# {name}: the current release\n\nThe current release of `{name}` is **{version}** (the "
            f"folder `{version}/`: its own README.md says what it holds). Written by each promotion; "
            "`CURRENT` is the record.\n").encode()


def promote(root: Any, name: str, version: str | int, *, backwards: bool = False) -> str | None:
    """Make ``version`` the current release of ``name`` (atomic, linearisable move of ``CURRENT``).

    Locally under an ``flock``; on an object store a compare-and-swap (``If-Match`` on the ETag read,
    retried on ``412``). Concurrent promotions are serialised: each returns exactly the version it
    replaced. An ordinary promotion only moves forward: when a newer version is current (another run
    promoted it meanwhile), nothing changes and :class:`NewerIsCurrent` says so; promoting the version
    that is already current changes nothing and returns it.

    Args:
        root: workspace root (directory, s3:// URI or Workspace).
        name: release name.
        version: a complete release whose manifest says the gate passed.
        backwards: allow moving to a version older than the current one (a rollback).

    Returns:
        the version that was current before (None if none was; ``version`` itself if it already was).

    Raises:
        NewerIsCurrent: a newer release is current and ``backwards`` is False (CURRENT unchanged).
        ValuegateError: the release is missing or incomplete, or its gate did not pass.
    """
    r = _root(root)
    version = _canonical(version)
    manifest = read_manifest(r, name, version)
    gate = manifest.get("gate") or {}
    if gate.get("passed") is not True:
        failures = "; ".join(str(f) for f in gate.get("failures") or []) or "no gate verdict recorded"
        raise ValuegateError(f"release {name}/{version} did not pass its gate ({failures}); "
                             "it cannot become current")
    key = f"{_base(name)}/{CURRENT_FILE}"
    if r.is_local:
        r.write_path(key)  # CURRENT is replaced: never through a symbolic link (one line naming it)
        with r.lock(f"{_base(name)}/{_LOCK_FILE}"):
            previous, seq = _parse_current(r.read_bytes(key))
            _check_forward(name, version, previous, backwards)
            if previous != version:
                r.write_atomic(key, _current_payload(version, seq + 1))
            r.write_atomic(f"{_base(name)}/{CURRENT_CARD}", current_card(name, version))
        return previous

    def compare_and_swap() -> tuple[bool, str | None]:
        """(moved or nothing to move, the version that was current)."""
        raw, etag = r.read_tagged(key)
        previous, seq = _parse_current(raw)
        _check_forward(name, version, previous, backwards)
        if previous == version:
            return True, previous
        return r.replace_if(key, _current_payload(version, seq + 1), etag if raw is not None else None), previous

    policy = retry.COMPARE_AND_SWAP
    done, previous = retry.call(compare_and_swap, what=f"promote {name}/{version}", policy=policy,
                                result_kind=lambda res: None if res[0] else "another promoter won",
                                error_kind=lambda exc: None)  # the requests retry their own failures
    if done:
        now, _ = _parse_current(r.read_bytes(key))  # a later promoter may have moved it again: its card wins
        if now is not None:
            r.write_atomic(f"{_base(name)}/{CURRENT_CARD}", current_card(name, now))
        return previous
    raise ValuegateError(f"could not move {r.uri_of(key)} after {policy.attempts} tries: other promoters "
                         "kept winning the conditional write")
