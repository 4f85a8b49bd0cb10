"""Files beside the LanceDB tables (releases, the workspace's id) on local disk or on an S3-compatible store.

LanceDB keeps the tables; everything else a workspace holds (``releases/...``) goes through a :class:`Root`:
one workspace root, local directory or ``s3://bucket/prefix``, with the few operations the release protocol
needs. Bulk bytes go through :mod:`pyarrow.fs` (``S3FileSystem``: multipart uploads, listings); the two
operations pyarrow does not offer, *create only if absent* and *replace only if unchanged*, and the GET that
returns an object's ETag, are single requests through obstore (the Python binding of the Rust
``object_store`` crate that LanceDB uses): ``PutMode`` ``create`` and ``{"e_tag": ...}``, i.e. ``If-None-Match: *``
and ``If-Match: <etag>`` on ``PutObject`` (S3 since 2024, MinIO, Ceph RGW, Cloudflare R2 and moto answer them;
a lost race is ``412``). They are retried by :mod:`valuegate.storage.retry` (obstore's own retries are off);
botocore was measured too and is about twice as slow per request (``tests/benchmarks/bench_objstore.py``).

Semantics on an object store (no rename, no exclusive mkdir, no lock):

* a single ``PUT`` (or the completion of a multipart upload) is atomic for readers: they see the old object
  or the new one, never part of one; so files are put directly, the completion record last;
* :meth:`Root.create` (``If-None-Match: *``) succeeds for exactly one of several concurrent callers;
* :meth:`Root.replace_if` (``If-Match: <etag>`` of what the caller read) succeeds only if nobody replaced
  the object in between: read-modify-write loops are linearisable (compare-and-swap).

Locally the same operations are ``O_EXCL`` creation, temporary file + ``fsync`` + ``os.replace``, and an
``flock`` around read-modify-write.

Storage options are LanceDB's (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``,
``aws_endpoint``, ``aws_region``, ``allow_http``, ``aws_virtual_hosted_style_request``), so the workspace's
own options reach its releases; without them the ``AWS_*`` environment variables are read as
:meth:`valuegate.storage.lance.Workspace.from_env` reads them.

This module never imports torch or LanceDB.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from valuegate.digests import sha256_file
from valuegate.errors import ValuegateError
from valuegate.storage import retry
from valuegate.storage.failures import no_space_as_error, unreachable

__all__ = ["Root", "link_under", "open_root", "refuse_links", "workspace_id"]

T = TypeVar("T")
WORKSPACE_ID_FILE = ".valuegate-workspace-id"


# --------------------------------------------------------------------------------------------------
# local primitives
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


def _write_local_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
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


def link_under(base: Path, path: Path) -> Path | None:
    """The first symbolic link on the way from ``base`` (not itself checked: the workspace root may be a
    link the user chose) down to ``path`` (included), or None. ``path`` must lie under ``base``."""
    current = base
    for part in path.relative_to(base).parts:
        current = current / part
        if current.is_symlink():
            return current
    return None


def refuse_links(base: Path, path: Path) -> Path:
    """``path`` when nothing between ``base`` and it is a symbolic link; what deletes, moves or overwrites
    a file of the workspace goes through this, so it never follows a link out of the workspace.

    Raises:
        ValuegateError: one line naming the link.
    """
    base = Path(base).absolute()
    path = Path(path).absolute()
    link = link_under(base, path)
    if link is not None:
        raise ValuegateError(f"{link} is a symbolic link; valuegate never writes or deletes through a link "
                             "inside the workspace (remove the link, or give the real directory)")
    return path


# --------------------------------------------------------------------------------------------------
# S3: options, pyarrow filesystem, single requests through obstore
# --------------------------------------------------------------------------------------------------


def s3_options_from_env() -> dict[str, str]:
    """S3 storage options from the ``AWS_*`` variables (endpoint, credentials, region; ``allow_http`` for
    an ``http://`` endpoint): what :meth:`Workspace.from_env` and the release store use."""
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3")
    pairs = {
        "aws_endpoint": endpoint,
        "aws_access_key_id": env.get("AWS_ACCESS_KEY_ID"),
        "aws_secret_access_key": env.get("AWS_SECRET_ACCESS_KEY"),
        "aws_session_token": env.get("AWS_SESSION_TOKEN"),
        "aws_region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    }
    out = {k: v for k, v in pairs.items() if v}
    if endpoint and endpoint.lower().startswith("http://"):
        out["allow_http"] = "true"
    return out


def _opt(options: dict[str, str], *names: str) -> str | None:
    for n in names:
        for k, v in options.items():
            if k.lower() == n and v not in (None, ""):
                return str(v)
    return None


class _S3:
    """The credentials, endpoint and addressing of one bucket; bulk I/O through pyarrow, the single
    requests pyarrow lacks through obstore."""

    def __init__(self, bucket: str, options: dict[str, str]) -> None:
        self.bucket = bucket
        self.region = _opt(options, "aws_region", "region") or "us-east-1"
        endpoint = _opt(options, "aws_endpoint", "endpoint", "aws_endpoint_url")
        self.access_key = _opt(options, "aws_access_key_id", "access_key_id")
        self.secret_key = _opt(options, "aws_secret_access_key", "secret_access_key")
        self.token = _opt(options, "aws_session_token", "session_token", "aws_token")
        if not (self.access_key and self.secret_key):
            self._credentials_from_chain()
        virtual = (_opt(options, "aws_virtual_hosted_style_request", "virtual_hosted_style_request")
                   or ("false" if endpoint else "true")).lower() == "true"
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
            self.scheme, self.netloc = parts.scheme, parts.netloc
        else:
            self.scheme, self.netloc = "https", f"s3.{self.region}.amazonaws.com"
        self.virtual = virtual
        self.endpoint_given = endpoint is not None

    def _credentials_from_chain(self) -> None:
        """No key in the options or the environment: botocore's credential chain (profiles, instance
        roles) when botocore is installed."""
        try:
            import botocore.session
        except ImportError:
            creds = None
        else:
            creds = botocore.session.get_session().get_credentials()
        if creds is None:
            raise ValuegateError(
                f"no S3 credentials for s3://{self.bucket}: set aws_access_key_id/aws_secret_access_key in "
                "the workspace's storage options or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        frozen = creds.get_frozen_credentials()
        self.access_key, self.secret_key, self.token = frozen.access_key, frozen.secret_key, frozen.token

    def filesystem(self):
        from pyarrow import fs

        kwargs: dict[str, Any] = {"access_key": self.access_key, "secret_key": self.secret_key,
                                  "session_token": self.token, "region": self.region,
                                  "scheme": self.scheme, "force_virtual_addressing": self.virtual,
                                  "request_timeout": 60, "connect_timeout": 10}
        if self.endpoint_given:
            kwargs["endpoint_override"] = self.netloc
        return fs.S3FileSystem(**kwargs)

    # ------------------------------------------------------------------ single requests (obstore)

    @functools.cached_property
    def store(self):
        """The obstore ``S3Store`` of the bucket: the requests pyarrow lacks (conditional PUTs, GET with
        ETag, DELETE), signed by the ``object_store`` crate (the one LanceDB uses). Its own retries are
        off: :func:`valuegate.storage.retry.call` retries (:data:`~valuegate.storage.retry.S3_REQUESTS`)."""
        from obstore.store import S3Store

        config: dict[str, Any] = {"region": self.region, "virtual_hosted_style_request": self.virtual,
                                  "access_key_id": self.access_key, "secret_access_key": self.secret_key}
        if self.token:
            config["session_token"] = self.token
        if self.endpoint_given:  # virtual-hosted: the bucket in the host name, as pyarrow's requests have it
            host = f"{self.bucket}.{self.netloc}" if self.virtual else self.netloc
            config["endpoint"] = f"{self.scheme}://{host}"
        return S3Store(self.bucket, config=config,
                       client_options={"allow_http": self.scheme == "http", "timeout": "60s",
                                       "connect_timeout": "10s"},
                       retry_config={"max_retries": 0})

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """One request under the retry policy; an obstore error that is not a lost race becomes one line."""
        from obstore.exceptions import BaseError, GenericError

        def kind(exc: BaseException) -> str | None:
            """Transport failures only (obstore: a ``GenericError``); not found, denied, a failed
            precondition never heal by waiting."""
            if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
                return None
            return retry.classify_error(exc, (GenericError, ConnectionError, TimeoutError),
                                        message=_one_line(exc))

        try:
            return retry.call(fn, what=f"S3 {what} s3://{self.bucket}/{key}", policy=retry.S3_REQUESTS,
                              error_kind=kind)
        except (BaseError, OSError) as exc:
            if kind(exc) == "transient":  # every attempt met a store that did not answer
                where = f" at {self.netloc if self.endpoint_given else 'S3'}"
                raise unreachable(where, f"S3 {what} s3://{self.bucket}/{key}: {_one_line(exc)}") from exc
            raise ValuegateError(f"S3 {what} s3://{self.bucket}/{key}: {_one_line(exc)}") from exc

    def get(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and ETag; (None, None) when it does not exist."""
        import obstore
        from obstore.exceptions import NotFoundError

        def get() -> tuple[bytes | None, str | None]:
            try:
                result = obstore.get(self.store, key)
            except (NotFoundError, FileNotFoundError):
                return None, None
            return bytes(result.bytes()), result.meta["e_tag"]

        return self._call("GET", key, get)

    def put(self, key: str, payload: bytes, *, if_none_match: bool = False,
            if_match: str | None = None) -> bool:
        """PUT; False when the precondition failed (412, or 409 for a concurrent conditional write, or the
        object of ``if_match`` deleted meanwhile)."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, GenericError, NotFoundError, PreconditionError

        mode: Any = "create" if if_none_match else {"e_tag": if_match} if if_match is not None else "overwrite"
        conditional = mode != "overwrite"

        def put() -> bool:
            try:
                obstore.put(self.store, key, payload, mode=mode, use_multipart=False)
            except (AlreadyExistsError, PreconditionError, FileExistsError):
                return False
            except (NotFoundError, FileNotFoundError):
                if if_match is not None:
                    return False
                raise
            except GenericError as exc:
                if conditional and "409 conflict" in str(exc).lower():
                    return False
                raise
            return True

        return self._call("PUT", key, put)

    def delete(self, key: str) -> None:
        """DELETE (absent: nothing happens)."""
        import obstore
        from obstore.exceptions import NotFoundError

        def delete() -> None:
            with contextlib.suppress(NotFoundError, FileNotFoundError):
                obstore.delete(self.store, key)

        self._call("DELETE", key, delete)


def _one_line(exc: BaseException) -> str:
    """The first line of an obstore error (the rest is a multi-line debug dump)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Root
# --------------------------------------------------------------------------------------------------


class Root:
    """A workspace root (local directory or ``s3://bucket/prefix``) for plain files; keys are relative,
    ``/``-separated paths such as ``releases/demo/v0001/data.parquet``."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None) -> None:
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        self.local: Path | None = None
        self._s3: _S3 | None = None
        if "://" not in uri:
            self.local = Path(uri).expanduser().absolute()
            self.uri = str(self.local)
            return
        scheme, _, rest = uri.partition("://")
        if scheme not in ("s3", "s3a"):
            raise ValuegateError(f"files on {scheme}:// are not supported; use a local directory or s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValuegateError(f"{uri}: no bucket")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._s3 = _S3(bucket, dict(storage_options) if storage_options else s3_options_from_env())
        self._fs = None

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def fs(self):
        if self._fs is None:
            self._fs = self._s3.filesystem()
        return self._fs

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fs_path(self, key: str) -> str:
        return f"{self.bucket}/{self._key(key)}"

    def path(self, key: str) -> Path:
        """Local only: the path of ``key``."""
        assert self.local is not None
        return self.local / key

    def write_path(self, key: str) -> Path:
        """Local only: the path of ``key`` for a write or a delete (:func:`refuse_links`: no component
        under the root is a symbolic link)."""
        assert self.local is not None
        return refuse_links(self.local, self.local / key)

    def link_in(self, key: str) -> Path | None:
        """Local only: the first symbolic link on the way from the root down to ``key``, or None."""
        assert self.local is not None
        return link_under(self.local, self.local / key)

    def uri_of(self, key: str) -> str:
        """``key`` as a local path or ``s3://`` URI (a string)."""
        return str(self.local / key) if self.local is not None else f"{self.uri}/{key}"

    # ------------------------------------------------------------------ reads

    def read_bytes(self, key: str) -> bytes | None:
        return self.read_tagged(key)[0]

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """The bytes of ``key`` and the tag :meth:`replace_if` compares (S3: its ETag; locally None, as
        local read-modify-write holds :meth:`lock` instead)."""
        if self.local is not None:
            try:
                return (self.local / key).read_bytes(), None
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None, None
        return self._s3.get(self._key(key))

    def is_file(self, key: str) -> bool:
        if self.local is not None:
            return (self.local / key).is_file()
        from pyarrow import fs

        return self.fs.get_file_info(self._fs_path(key)).type == fs.FileType.File

    def exists_prefix(self, key: str) -> bool:
        """A directory locally; at least one object under ``key/`` on S3."""
        if self.local is not None:
            return (self.local / key).is_dir()
        return bool(self.list(key, hidden=True))

    def list(self, key: str, hidden: bool = False) -> list[str]:
        """Names directly under ``key`` (files and sub-directories / common prefixes), sorted; dot-prefixed
        names left out unless ``hidden``; empty when nothing is there."""
        if self.local is not None:
            try:
                names = os.listdir(self.local / key)
            except (FileNotFoundError, NotADirectoryError):
                return []
        else:
            from pyarrow import fs

            sel = fs.FileSelector(self._fs_path(key), recursive=False, allow_not_found=True)
            names = [info.base_name for info in self.fs.get_file_info(sel)]
        return sorted(n for n in names if hidden or not n.startswith("."))

    def sha256(self, key: str) -> str:
        if self.local is not None:
            return sha256_file(self.local / key)
        h = hashlib.sha256()
        with self.fs.open_input_stream(self._fs_path(key)) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def read_parquet(self, key: str, columns: list[str] | None = None) -> pl.DataFrame:
        if self.local is not None:
            return pl.read_parquet(self.local / key, columns=columns)
        with self.fs.open_input_file(self._fs_path(key)) as f:
            return pl.read_parquet(io.BytesIO(f.read()), columns=columns)

    # ------------------------------------------------------------------ writes

    def delete(self, key: str) -> None:
        """Remove the file or object ``key`` (absent: nothing happens). On S3 one ``DELETE``: unlike
        pyarrow's ``delete_file`` it leaves no empty directory marker (``<parent>/``) behind."""
        if self.local is not None:
            self.write_path(key).unlink(missing_ok=True)
            return
        self._s3.delete(self._key(key))

    def write_atomic(self, key: str, payload: bytes) -> None:
        """Write ``key`` whole: readers see the old bytes or the new ones (local: temporary + rename)."""
        if self.local is not None:
            with no_space_as_error(self.uri_of(key)):
                _write_local_atomic(self.write_path(key), payload)
        else:
            self._s3.put(self._key(key), payload)

    def create(self, key: str, payload: bytes = b"") -> bool:
        """Create ``key`` only if absent; False when it exists (exactly one concurrent caller wins)."""
        if self.local is not None:
            path = self.write_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(path.parent)
            return True
        return self._s3.put(self._key(key), payload, if_none_match=True)

    def replace_if(self, key: str, payload: bytes, tag: str | None) -> bool:
        """S3 compare-and-swap: put ``payload`` if ``key`` still has ETag ``tag`` (``None``: if it is still
        absent); False when another writer got there first."""
        if self.local is not None:
            raise ValuegateError("replace_if is for object stores; hold lock() locally")
        if tag is None:
            return self._s3.put(self._key(key), payload, if_none_match=True)
        return self._s3.put(self._key(key), payload, if_match=tag)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Local only: an exclusive ``flock`` on ``key`` (created if missing) for a read-modify-write."""
        assert self.local is not None
        path = self.write_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl
            except ImportError:  # no flock (Windows): last writer wins, each write still atomic
                yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def upload_file(self, src: Path, key: str) -> None:
        """Copy a local file to ``key`` (S3: one PUT, multipart for big files: atomic either way)."""
        from pyarrow import fs

        fs.copy_files(str(src), self._fs_path(key), source_filesystem=fs.LocalFileSystem(),
                      destination_filesystem=self.fs)

    def upload_tree(self, src: Path, key: str) -> None:
        """Copy a local folder under ``key/`` (objects replaced one by one)."""
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            self.upload_file(path, f"{key}/{path.relative_to(src).as_posix()}")

    def write_parquet(self, key: str, table: pa.Table, schema: pa.Schema, batch_rows: int = 8192) -> str:
        """Write ``table`` as Parquet (cast to ``schema`` batch by batch); returns the bytes' sha256.
        Locally through a temporary file, fsync and rename; on S3 staged in a local temporary file, then
        one upload."""
        if self.local is not None:
            directory = self.write_path(key).parent
            directory.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_name(directory, Path(key).name)
        else:
            import tempfile

            fd, name = tempfile.mkstemp(suffix=".parquet", prefix="valuegate-release-")
            os.close(fd)
            tmp = Path(name)
        with no_space_as_error(self.uri_of(key)):
            try:
                with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                    for batch in table.to_batches(max_chunksize=batch_rows):
                        writer.write_table(pa.Table.from_batches([batch]).cast(schema), row_group_size=batch_rows)
                digest = sha256_file(tmp)
                if self.local is not None:
                    with open(tmp, "rb+") as fh:
                        os.fsync(fh.fileno())
                    os.replace(tmp, self.local / key)
                    _fsync_dir(directory)
                else:
                    self.upload_file(tmp, key)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return digest

    def copy_in(self, src: Path, key: str) -> None:
        """Copy a local file or folder to ``key``, replacing what is there (locally through a temporary
        name and a rename)."""
        if self.local is None:
            if src.is_dir():
                self.upload_tree(src, key)
            else:
                self.upload_file(src, key)
            return
        with no_space_as_error(self.uri_of(key)):
            self._copy_in_local(src, key)

    def _copy_in_local(self, src: Path, key: str) -> None:
        dest = self.write_path(key)
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


@functools.lru_cache(maxsize=64)
def _cached_root(uri: str, options: tuple[tuple[str, str], ...] | None) -> Root:
    return Root(uri, dict(options) if options is not None else None)


def open_root(root: Any) -> Root:
    """The :class:`Root` of a workspace: a :class:`Root`, an object with ``uri`` and ``storage_options``
    (a :class:`~valuegate.storage.lance.Workspace`: its own options), or a path / URI string (S3 options
    from the environment)."""
    if isinstance(root, Root):
        return root
    if hasattr(root, "uri") and hasattr(root, "storage_options"):
        uri, options = root.uri, root.storage_options
    else:
        uri, options = os.fspath(root), None
    if not uri:
        raise ValuegateError("the workspace root is empty; give a directory or an s3:// URI")
    if "://" not in uri or uri.startswith("file://"):
        return Root(uri)  # local: cheap, and never cached across a changed cwd
    return _cached_root(uri, tuple(sorted(options.items())) if options else None)


def workspace_id(root: Any) -> str:
    """The workspace's identity: a random id stored once in ``<root>/.valuegate-workspace-id`` (created
    with create-if-absent, so concurrent first callers agree). A wiped and recreated workspace gets a new
    one, which is what keys the local cache of an object-store workspace."""
    r = open_root(root)
    raw = r.read_bytes(WORKSPACE_ID_FILE)
    if raw is None:
        r.create(WORKSPACE_ID_FILE, uuid.uuid4().hex.encode())
        raw = r.read_bytes(WORKSPACE_ID_FILE)
    if not raw:
        raise ValuegateError(f"{r.uri_of(WORKSPACE_ID_FILE)} could not be read back")
    return raw.decode().strip()
