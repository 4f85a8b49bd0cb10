"""What a failure of the store means for the user: a full device, a damaged table or an object store that
stopped answering, as one line (issue 26).

LanceDB reports both from Rust, as ``OSError``, ``RuntimeError`` or ``ValueError`` whose text says what
happened (``No space left on device (os error 28)``; ``failed to fill whole buffer`` for a truncated data
file, ``invalid magic`` for a zeroed one, ``Not found: .../<table>.lance/data/...`` for a missing one).
:func:`store_failure` reads that text (and ``errno``) and returns the :class:`~valuegate.errors.NoSpace`,
:class:`~valuegate.errors.DamagedTable` or :class:`~valuegate.errors.StoreUnreachable` to raise instead, or None
for anything else. A transport failure (what :func:`valuegate.storage.retry.classify_error` calls transient) is
only translated at the edge, after the requests' and the steps' own retries gave up.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator

from valuegate.errors import DamagedTable, NoSpace, StoreUnreachable, ValuegateError

__all__ = ["is_damage", "is_no_space", "is_unreachable", "no_space_as_error", "short_reason", "store_failure",
           "table_of", "unreachable"]

_NO_SPACE_MARKERS = ("no space left on device", "os error 28", "errno 28", "disk quota exceeded", "os error 122")
# what Lance says when a data file, a manifest or an index is truncated, zeroed or gone
_DAMAGE_MARKERS = (
    "failed to fill whole buffer",
    "does not appear to be a lance file",
    "invalid magic",
    "unexpected eof",
    "unexpected end of file",
    "corrupt",
    "failed to decode",
    "decodeerror",
)
_RUST_PLACE = re.compile(r",?\s*/\S+\.rs:\d+:\d+")
_HOST = re.compile(r"(?:connect to|connecting to|host) '?([A-Za-z0-9.\-]+:\d+)")
_BUCKET = re.compile(r"bucket '([^']+)'")
_TABLE_PATH = re.compile(r"([A-Za-z0-9_\-.]+?)\.lance/(?:data|_versions|_indices|_transactions|_deletions)/")


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the device is full."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e).lower() for m in _NO_SPACE_MARKERS):
            return True
    return False


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc`` says a file of a Lance table is truncated, zeroed or missing."""
    for e in _chain(exc):
        if isinstance(e, ValuegateError):
            return False
        text = str(e).lower()
        if any(m in text for m in _DAMAGE_MARKERS):
            return True
        if "not found" in text and _TABLE_PATH.search(str(e)):
            return True
    return False


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is the object store not answering: a transport failure (connection refused, reset,
    timed out; :func:`valuegate.storage.retry.classify_error`), not a full device or a denied request."""
    from valuegate.storage.retry import classify_error

    return any(not isinstance(e, ValuegateError) and classify_error(e) == "transient" for e in _chain(exc))


def unreachable(where: str, detail: str) -> StoreUnreachable:
    """The one line of an object store that stopped answering: ``where`` (`` at <host:port>`` or empty),
    ``detail`` (the request and what it met)."""
    return StoreUnreachable(f"the object store{where} did not answer after every retry ({detail}); run again when "
                            "it is back: what was committed stays, nothing half-written is visible")


def _store_named(exc: BaseException) -> str:
    """``at <host:port>`` or ``of bucket <name>`` as the error says it, else nothing."""
    for e in _chain(exc):
        host, bucket = _HOST.search(str(e)), _BUCKET.search(str(e))
        if host or bucket:
            return f" at {host.group(1)}" if host else f" of bucket {bucket.group(1)}"
    return ""


def table_of(exc: BaseException) -> str | None:
    """The table whose file the error names (``features__ab12`` of ``.../features__ab12.lance/data/x``)."""
    for e in _chain(exc):
        m = _TABLE_PATH.search(str(e))
        if m:
            return m.group(1)
    return None


def store_failure(exc: BaseException, what: str | None = None, table: str | None = None,
                  workspace: str | None = None) -> ValuegateError | None:
    """The one-line error a store failure stands for, or None when it is neither a full device nor damage.

    Args:
        exc: the exception raised.
        what: what was being done (``"append to features__ab12"``, a path): named in the line.
        table: the table concerned, when the caller knows it (else read from the error's path).
        workspace: the workspace URI, for the ``valuegate verify`` hint.
    """
    if isinstance(exc, (NoSpace, DamagedTable, StoreUnreachable)):
        return exc
    if isinstance(exc, ValuegateError):
        return None
    if is_no_space(exc):
        target = what or getattr(exc, "filename", None) or "the workspace"
        return NoSpace(f"no space left on device while writing {target} (free space and run again: what was "
                       "committed stays, nothing half-written is visible)")
    if is_damage(exc):
        name = table or table_of(exc) or "a table"
        hint = f"valuegate verify --workspace {workspace}" if workspace else "valuegate verify"
        return DamagedTable(f"table {name} is damaged ({short_reason(exc)}); run `{hint}` to see what is damaged and "
                            "repair what can be derived again")
    if is_unreachable(exc):
        return unreachable(_store_named(exc), short_reason(exc))
    return None


@contextlib.contextmanager
def no_space_as_error(what: str) -> Iterator[None]:
    """Within the block, a full device (``OSError`` ENOSPC) becomes :class:`NoSpace` naming ``what`` (a
    file being written), which no task retries."""
    try:
        yield
    except OSError as exc:
        if not is_no_space(exc):
            raise
        raise NoSpace(f"no space left on device while writing {what} (free space and run again: nothing "
                      "half-written is visible)") from exc


def short_reason(exc: BaseException) -> str:
    """The first line of an error, without the Rust source place (which says nothing to a user), at most
    200 characters."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _RUST_PLACE.sub("", first)[:200]


def _chain(exc: BaseException):
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
