"""Release directory layout and atomic promotion (DESIGN §3, "Releases").

Layout, under the workspace root::

    <root>/releases/<name>/
        CURRENT                 one line: the version that is current (absent: none yet)
        v0001/                  one release (versions allocated by exclusive mkdir, never reused)
            data.parquet        the kept training rows: plain Arrow columns (no extension, dictionary,
                                view or large-offset types, no polars metadata), so polars and
                                ``datasets.load_dataset("parquet", data_files=...)`` read it as is;
                                at least ``id`` (str, unique) and ``value`` (float, the value the
                                selection policy read)
            scores.parquet      optional: every sample scored by the run, ``id``, ``value``, ``kept``
                                (bool); what :func:`valuegate.tasks.release.diff_releases` reads to say
                                why an id entered or left
            <extra>             optional files/folders copied in (the gate's Data Docs, report.html)
            manifest.json       written last: the completion record (a release without it is incomplete,
                                is not listed, cannot be read or promoted)

Write protocol (local disk): every file is written to a dot-prefixed temporary name in its final
directory, flushed and fsynced, then ``os.replace``d onto its name; the directory is fsynced after each
rename. ``manifest.json`` goes last, carrying the sha256 of ``data.parquet`` (and of ``scores.parquet``).
A crash at any point leaves either a complete release or a version directory without manifest, which
everything here ignores; retrying :func:`write_release` on the same version completes it.

``CURRENT`` moves by writing a temporary file beside it, fsync, ``os.replace`` (atomic on POSIX and
Windows), fsync of the directory. Concurrent promotions are last-writer-wins; each one is atomic, so a
reader sees the old or the new version, never a torn one, and only ever a complete release whose gate
passed (:func:`promote` checks both before moving).

Object stores (later): every filesystem access of this module goes through the small private helpers at
the top (``_mkdir_exclusive``, ``_write_bytes_atomic``, ``_read_bytes``, ``_list_dir``, ``_copy_in``),
so they can be re-implemented over :mod:`pyarrow.fs` without touching the callers. An object store has no
rename and no exclusive mkdir; the equivalents are:

* version allocation: a conditional put (``If-None-Match: *``) of ``<name>/<version>/.allocated``; a
  412 answer means another run took the version: try the next one (same loop as here);
* file writes: a single PUT is already atomic (readers never see half an object), so data files are put
  directly and ``manifest.json`` is still put last as the completion record;
* ``CURRENT``: a pointer object replaced with a conditional put: read it with its ETag (or generation),
  put the new content with ``If-Match: <etag>`` (``If-None-Match: *`` when absent), and on a 412 re-read
  and retry. Stores without conditional overwrite can use versioned pointer objects instead:
  ``CURRENT.<seq>`` created with ``If-None-Match: *`` (seq = last + 1), the reader taking the highest
  ``seq``; a rollback is then just a new pointer object naming an older version.

This module never imports torch or LanceDB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from valuegate.errors import ValuegateError

__all__ = [
    "CURRENT_FILE",
    "DATA_FILE",
    "MANIFEST_FILE",
    "SCORES_FILE",
    "allocate_version",
    "format_version",
    "list_release_names",
    "list_releases",
    "parse_version",
    "promote",
    "read_current",
    "read_manifest",
    "read_release_data",
    "read_release_scores",
    "release_dir",
    "release_exists",
    "release_scores_exist",
    "release_uri",
    "releases_uri",
    "write_release",
]

DATA_FILE = "data.parquet"
SCORES_FILE = "scores.parquet"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
_RESERVED = {DATA_FILE, SCORES_FILE, MANIFEST_FILE, CURRENT_FILE}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION = re.compile(r"^v(\d{4,})$")
_ALLOCATE_ATTEMPTS = 1000


# --------------------------------------------------------------------------------------------------
# Filesystem primitives (the only code that touches the disk; swap these for pyarrow.fs on object stores)
# --------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or creation in it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(directory: Path, final: str) -> Path:
    """A dot-prefixed, unique temporary path beside ``final`` (ignored by every listing)."""
    return directory / f".{final}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _mkdir_exclusive(path: Path) -> bool:
    """Create ``path``; False when it already exists (the exclusive step of version allocation)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    _fsync_dir(path.parent)
    return True


def _write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file, fsync and ``os.replace``."""
    tmp = _tmp_name(path.parent, path.name)
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _write_parquet_atomic(path: Path, table: pa.Table, schema: pa.Schema, batch_rows: int = 8192) -> str:
    """Write ``table`` as Parquet with ``schema`` (cast batch by batch, so narrowing 64-bit offsets to 32-bit
    ones never overflows) through a temporary file, fsync, ``os.replace``; returns the file's sha256."""
    tmp = _tmp_name(path.parent, path.name)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema), row_group_size=batch_rows)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = _sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return digest


def _read_bytes(path: Path) -> bytes | None:
    """The bytes of ``path``, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _list_dir(directory: Path) -> list[str]:
    """Entry names of ``directory`` (empty when it does not exist), dot-prefixed temporaries excluded."""
    try:
        return sorted(e for e in os.listdir(directory) if not e.startswith("."))
    except FileNotFoundError:
        return []


def _copy_in(src: Path, dest: Path) -> None:
    """Copy a file or folder to ``dest`` through a temporary name and ``os.replace`` (replacing ``dest``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest.parent, dest.name)
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
            if dest.exists():  # a retry after a crash: the old copy is replaced whole
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        else:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if dest.is_dir():
                shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _fsync_dir(dest.parent)


def _remove_temporaries(directory: Path) -> None:
    """Remove the leftovers of a crashed write (dot-prefixed ``*.tmp`` entries) in a release directory."""
    for entry in os.listdir(directory):
        if entry.startswith(".") and entry.endswith(".tmp"):
            p = directory / entry
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Names, versions, paths
# --------------------------------------------------------------------------------------------------


def _local_root(root: str | os.PathLike[str]) -> Path:
    """The workspace root as a local path (``file://`` stripped); object-store URIs are refused for now."""
    uri = os.fspath(root)
    if not uri:
        raise ValuegateError("the workspace root is empty; give a directory")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValuegateError(f"releases on an object store ({uri}) are not supported yet; "
                             "use a local workspace directory")
    return Path(uri).expanduser()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValuegateError(f"release name {name!r}: use letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit)")
    return name


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


def releases_uri(root: str | os.PathLike[str], name: str) -> str:
    """Where the releases of ``name`` live: ``<root>/releases/<name>`` (a local path, as a string)."""
    return str(_local_root(root) / "releases" / _check_name(name))


def release_dir(root: str | os.PathLike[str], name: str, version: str | int) -> Path:
    """Directory of one release: ``<root>/releases/<name>/<version>`` (``version`` normalised to vNNNN)."""
    return Path(releases_uri(root, name)) / _canonical(version)


def release_uri(root: str | os.PathLike[str], name: str, version: str | int) -> str:
    """:func:`release_dir` as a string (the ``*_uri`` of the convention)."""
    return str(release_dir(root, name, version))


def _version_numbers(directory: Path) -> list[int]:
    """Release numbers of every version directory under ``directory`` (complete or not), ascending."""
    return sorted(int(m.group(1)) for e in _list_dir(directory) if (m := _VERSION.match(e)))


# --------------------------------------------------------------------------------------------------
# Allocation and writing
# --------------------------------------------------------------------------------------------------


def allocate_version(root: str | os.PathLike[str], name: str) -> str:
    """Reserve the next version of ``name`` by creating its directory exclusively.

    Takes one past the highest existing version directory and ``mkdir``s it; when another run created it
    first (``FileExistsError``), re-lists and tries the next number. Two runs on one workspace therefore
    never get the same version. Numbers are never reused: a run that crashed before its manifest leaves a
    gap (its directory stays, incomplete and ignored).

    Args:
        root: workspace root directory.
        name: release name (letters, digits, ``.``, ``_``, ``-``).

    Returns:
        the reserved version, e.g. ``"v0003"``; its directory exists and is empty.

    Raises:
        ValuegateError: bad name, object-store root, or no version could be reserved after many tries.
    """
    base = Path(releases_uri(root, name))
    base.mkdir(parents=True, exist_ok=True)
    number = max(_version_numbers(base), default=0) + 1
    for _ in range(_ALLOCATE_ATTEMPTS):
        if _mkdir_exclusive(base / format_version(number)):
            return format_version(number)
        number = max([number, *_version_numbers(base)]) + 1
    raise ValuegateError(f"could not reserve a release version under {base} after {_ALLOCATE_ATTEMPTS} "
                         "tries; is something else creating directories there?")


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


def write_release(root: str | os.PathLike[str], name: str, version: str, data: pl.DataFrame,
                  manifest: dict[str, Any], extra: dict[str, Path] | None = None, *,
                  scores: pl.DataFrame | None = None) -> Path:
    """Write one release into its allocated directory; ``manifest.json`` last, as the completion record.

    Order: ``data.parquet`` (temporary name, fsync, rename) → ``scores.parquet`` (same) → the extra
    files/folders (copied, same) → ``manifest.json`` (same). A crash before the manifest leaves an
    incomplete release that is never listed, read or promoted; calling this again on the same version
    completes it.

    Args:
        root: workspace root directory.
        name: release name.
        version: a version from :func:`allocate_version` (its directory is created if missing).
        data: the kept training rows, ``(n_kept, columns)``: at least ``id`` (str, unique) and ``value``
            (float); every other column (prompt, response, metadata...) is kept as is, as plain Arrow types.
        manifest: the release's provenance (see :func:`valuegate.tasks.release.build_manifest`); stored
            with ``name``, ``version``, ``data_sha256`` (sha256 of the ``data.parquet`` bytes),
            ``data_rows``, ``scores_sha256`` (or None) and ``files`` (the extra names) filled in.
        extra: name inside the release directory → source file or folder to copy in (e.g.
            ``{"gate": docs_dir, "report.html": report}``).
        scores: every sample the run scored, at least ``id`` and ``value`` (one row per id); stored as
            ``scores.parquet`` with ``id``, ``value`` and ``kept`` (= the id is in ``data``). Without it,
            :func:`valuegate.tasks.release.diff_releases` cannot tell why an id entered or left.

    Returns:
        the release directory.

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
    extras = {_check_extra_name(k): Path(v) for k, v in (extra or {}).items()}
    for key, src in extras.items():
        if not src.exists():
            raise ValuegateError(f"extra release file {key!r}: {src} does not exist")

    rdir = release_dir(root, name, version)
    if release_exists(root, name, version):
        raise ValuegateError(f"release {name}/{version} is already complete; releases are immutable "
                             "(allocate a new version)")
    rdir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(rdir)

    data_sha = _write_parquet_atomic(rdir / DATA_FILE, *_plain_table(data, "release data"))
    scores_sha = None
    if scores is not None:
        kept = scores.select(pl.col("id").cast(pl.String), pl.col("value").cast(pl.Float64)).with_columns(
            kept=pl.col("id").is_in(data["id"].cast(pl.String).implode()))
        scores_sha = _write_parquet_atomic(rdir / SCORES_FILE, *_plain_table(kept, "release scores"))
    for key, src in extras.items():
        _copy_in(src, rdir / key)

    record = {**manifest, "name": name, "version": version, "data_sha256": data_sha,
              "data_rows": data.height, "scores_sha256": scores_sha, "files": sorted(extras)}
    payload = json.dumps(record, indent=2, sort_keys=True, default=_json_default).encode() + b"\n"
    _write_manifest(rdir, payload)
    return rdir


def _write_manifest(rdir: Path, payload: bytes) -> None:
    """The completion record's write (its own function so a test can simulate a crash just before it)."""
    _write_bytes_atomic(rdir / MANIFEST_FILE, payload)


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


def release_exists(root: str | os.PathLike[str], name: str, version: str | int) -> bool:
    """Whether the release is complete (its ``manifest.json`` is present)."""
    return (release_dir(root, name, version) / MANIFEST_FILE).is_file()


def read_manifest(root: str | os.PathLike[str], name: str, version: str | int) -> dict[str, Any]:
    """The manifest of a complete release.

    Raises:
        ValuegateError: the release does not exist or is incomplete (its run crashed before the manifest).
    """
    path = release_dir(root, name, version) / MANIFEST_FILE
    raw = _read_bytes(path)
    if raw is None:
        known = [r["version"] for r in list_releases(root, name)]
        raise ValuegateError(f"no complete release {name}/{_canonical(version)} "
                             f"(complete releases: {', '.join(known) or 'none'})")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValuegateError(f"{path} is not valid JSON ({exc}); the release is damaged") from exc


def read_release_data(root: str | os.PathLike[str], name: str, version: str | int,
                      columns: list[str] | None = None, verify: bool = False) -> pl.DataFrame:
    """The kept rows of a complete release, ``(n_kept, columns)``.

    Args:
        columns: read only these columns (all when None).
        verify: check the file's sha256 against the manifest's ``data_sha256`` first (reads the file twice).

    Raises:
        ValuegateError: incomplete/missing release, or a hash mismatch with ``verify``.
    """
    manifest = read_manifest(root, name, version)
    path = release_dir(root, name, version) / DATA_FILE
    if verify and _sha256_file(path) != manifest.get("data_sha256"):
        raise ValuegateError(f"{path} does not match the sha256 of its manifest; the release is damaged")
    return pl.read_parquet(path, columns=columns)


def release_scores_exist(root: str | os.PathLike[str], name: str, version: str | int) -> bool:
    """Whether a complete release carries the scores of its run (``scores.parquet``)."""
    return release_exists(root, name, version) and (release_dir(root, name, version) / SCORES_FILE).is_file()


def read_release_scores(root: str | os.PathLike[str], name: str, version: str | int) -> pl.DataFrame:
    """Every sample scored by the release's run: ``id`` (str), ``value`` (float64), ``kept`` (bool).

    Raises:
        ValuegateError: incomplete/missing release, or one written without scores.
    """
    read_manifest(root, name, version)
    path = release_dir(root, name, version) / SCORES_FILE
    if not path.is_file():
        raise ValuegateError(f"release {name}/{_canonical(version)} was written without the scores of its run")
    return pl.read_parquet(path)


def read_current(root: str | os.PathLike[str], name: str) -> str | None:
    """The current version of ``name`` (what ``CURRENT`` names), or None before any promotion."""
    raw = _read_bytes(Path(releases_uri(root, name)) / CURRENT_FILE)
    if raw is None:
        return None
    text = raw.decode().strip()
    return text or None


def list_releases(root: str | os.PathLike[str], name: str) -> list[dict[str, Any]]:
    """Manifests of every complete release of ``name``, oldest first.

    Returns:
        one manifest per release, each with ``version`` (vNNNN) and ``current`` (bool) set; incomplete
        releases (no manifest) are left out.
    """
    base = Path(releases_uri(root, name))
    current = read_current(root, name)
    out = []
    for number in _version_numbers(base):
        version = format_version(number)
        if not release_exists(root, name, version):
            continue
        m = read_manifest(root, name, version)
        m["version"] = version
        m["current"] = version == current
        out.append(m)
    return out


def list_release_names(root: str | os.PathLike[str]) -> list[str]:
    """Names that have at least one version directory under ``<root>/releases``, sorted."""
    base = _local_root(root) / "releases"
    return [e for e in _list_dir(base) if _NAME.match(e) and (base / e).is_dir()
            and _version_numbers(base / e)]


# --------------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------------


def promote(root: str | os.PathLike[str], name: str, version: str | int) -> str | None:
    """Make ``version`` the current release of ``name`` (atomic move of ``CURRENT``).

    Args:
        root: workspace root directory.
        name: release name.
        version: a complete release whose manifest says the gate passed.

    Returns:
        the version that was current before (None if none was).

    Raises:
        ValuegateError: the release is missing or incomplete, or its gate did not pass.
    """
    version = _canonical(version)
    manifest = read_manifest(root, name, version)
    gate = manifest.get("gate") or {}
    if gate.get("passed") is not True:
        failures = "; ".join(str(f) for f in gate.get("failures") or []) or "no gate verdict recorded"
        raise ValuegateError(f"release {name}/{version} did not pass its gate ({failures}); "
                             "it cannot become current")
    previous = read_current(root, name)
    _write_bytes_atomic(Path(releases_uri(root, name)) / CURRENT_FILE, f"{version}\n".encode())
    return previous
