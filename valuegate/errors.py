"""valuegate's named errors. Each class has a *kind* (:class:`ErrorKind`, data: its exit code, whether a task
retries it, whether the CLI shows its traceback, what it means); the CLI, the flows' retry condition and the
help text read the kind, never the message.

Every message is one line that names the file, row, field, config key or release it is about; the CLI
prints it as ``valuegate: error: <message>`` without a traceback (an :class:`InternalError` also prints
its traceback: it is a bug). None of them but :class:`StoreUnreachable` is retried by a Prefect task
(:mod:`valuegate.flows.user_errors`, reading ``kind.retried``): each would only fail again.

======  ======================  ==========================================================================
exit    class                   meaning
======  ======================  ==========================================================================
2       :class:`BadInput`       bad input or config: a file, row, column, setting or name to fix
                                (a plain :class:`ValuegateError` is one too)
3       :class:`GateFailed`     the candidate release failed the gate: it is written for inspection,
                                the previous release stays current
4       :class:`ClusterLost`    the Dask/Ray cluster went away mid-run: what was stored stays, a re-run
                                resumes
5       :class:`NoSpace`        no space left on the device being written: nothing half-written is
                                visible; free space and run again (it resumes)
6       :class:`DamagedTable`   a table or release of the workspace is damaged (a truncated or zeroed
                                file): ``valuegate verify`` says what and repairs what can be derived again
7       :class:`StoreUnreachable` the workspace's object store stopped answering after every retry: what
                                was committed stays; a re-run once it is back resumes
70      :class:`InternalError`  a broken invariant (a bug in valuegate); EX_SOFTWARE of sysexits.h
130     (KeyboardInterrupt)     interrupted by SIGINT or SIGTERM: ``valuegate: interrupted``, stopped
                                within a batch, nothing half-written; a re-run resumes
======  ======================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class ErrorKind:
    """What an error means for whoever meets it: the CLI's exit code and help line, a task's retry.

    Attributes:
        name: a short name (``bad_input``, ``gate_failed``, ...).
        exit_code: what ``valuegate`` exits with when an error of this kind ends a command.
        meaning: the line of the exit code in ``valuegate --help``.
        retried: whether a Prefect task's retry policy applies (an object store that stopped answering may be
            back); every other kind is deterministic and would only fail again.
        traceback: whether the CLI and the console show its traceback (a broken invariant: a bug).
    """

    name: str
    exit_code: int
    meaning: str
    retried: bool = False
    traceback: bool = False


BAD_INPUT = ErrorKind("bad_input", 2, "bad input or config (a file, row, column, setting or name to fix; also a "
                      "usage error)")
GATE_FAILED = ErrorKind("gate_failed", 3, "the gate failed: the release is written for inspection, the previous one "
                        "stays current")
CLUSTER_LOST = ErrorKind("cluster_lost", 4, "the Dask/Ray cluster was lost mid-run: what was stored stays, a re-run "
                         "resumes")
NO_SPACE = ErrorKind("no_space", 5, "no space left on device: nothing half-written is visible; free space, a re-run "
                     "resumes")
DAMAGED_TABLE = ErrorKind("damaged_table", 6, "a damaged table or release: run `valuegate verify` "
                          "(docs/reliability.md)")
STORE_UNREACHABLE = ErrorKind("store_unreachable", 7, "the workspace's object store stopped answering: run again "
                              "when it is back; it resumes", retried=True)
INTERNAL = ErrorKind("internal", 70, "internal error: a broken invariant, a bug in valuegate (its traceback is "
                     "printed)", traceback=True)

#: every kind, in the order of their exit codes (the CLI's help lists them so).
KINDS: tuple[ErrorKind, ...] = (BAD_INPUT, GATE_FAILED, CLUSTER_LOST, NO_SPACE, DAMAGED_TABLE, STORE_UNREACHABLE,
                                INTERNAL)


class ValuegateError(Exception):
    """The base of valuegate's errors; raised as itself, a user error (bad input or config, exit 2).

    Attributes:
        kind (ErrorKind): what the error means (its exit code, retry, traceback): data, read by the CLI and
            the flows instead of the message.
        exit_code (int): ``kind.exit_code``, what ``valuegate`` exits with when this error ends a command.
    """

    kind: ClassVar[ErrorKind] = BAD_INPUT
    exit_code: ClassVar[int] = BAD_INPUT.exit_code

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.exit_code = cls.kind.exit_code


class BadInput(ValuegateError):
    """Bad input or config (a file, row, column, setting or name): fix it and run again (exit 2)."""

    kind = BAD_INPUT


class GateFailed(ValuegateError):
    """The candidate release failed the gate's checks; it never becomes current (exit 3)."""

    kind = GATE_FAILED


class ClusterLost(ValuegateError):
    """The Dask or Ray cluster went away during a run; what was stored stays and a re-run resumes (exit 4)."""

    kind = CLUSTER_LOST


class NoSpace(ValuegateError):
    """The device being written is full (``OSError`` ENOSPC): one line saying what was being written (exit 5).
    Every write is atomic (a Lance commit, a temporary file renamed), so nothing half-written is visible and
    a re-run after freeing space resumes."""

    kind = NO_SPACE


class DamagedTable(ValuegateError):
    """A table (or a release) of the workspace cannot be read: a truncated, zeroed or missing data file
    (exit 6). The line names the table and says to run ``valuegate verify``."""

    kind = DAMAGED_TABLE


class StoreUnreachable(ValuegateError):
    """The object store of the workspace stopped answering (connections refused, reset or timed out) after
    every retry (exit 7). Every write is atomic, so what was committed stays and nothing half-written is
    visible; a re-run once the store is back resumes."""

    kind = STORE_UNREACHABLE


class InternalError(ValuegateError):
    """A broken invariant: a bug in valuegate, not in the input (exit 70, EX_SOFTWARE)."""

    kind = INTERNAL


#: exit code → the class, for the CLI's help and docs/configuration.md (the codes of ``valuegate``).
EXIT_CODES: dict[int, type[ValuegateError]] = {
    c.exit_code: c for c in (BadInput, GateFailed, ClusterLost, NoSpace, DamagedTable, StoreUnreachable, InternalError)
}


def kind_of(exc: BaseException) -> ErrorKind | None:
    """The kind of ``exc``: its own for a :class:`ValuegateError`, :data:`INTERNAL` for an ``AssertionError``
    (a broken invariant), else None (a foreign error: :mod:`valuegate.storage.failures` classifies those)."""
    if isinstance(exc, ValuegateError):
        return exc.kind
    return INTERNAL if isinstance(exc, AssertionError) else None
