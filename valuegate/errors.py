"""valuegate's named errors, each with the exit code the CLI returns for it.

Every message is one line that names the file, row, field, config key or release it is about; the CLI
prints it as ``valuegate: error: <message>`` without a traceback (an :class:`InternalError` also prints
its traceback: it is a bug). None of them is retried by a Prefect task (:mod:`valuegate.flows.user_errors`):
each would only fail again.

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
70      :class:`InternalError`  a broken invariant (a bug in valuegate); EX_SOFTWARE of sysexits.h
130     (KeyboardInterrupt)     interrupted by SIGINT or SIGTERM: ``valuegate: interrupted``, stopped
                                within a batch, nothing half-written; a re-run resumes
======  ======================  ==========================================================================
"""

from __future__ import annotations


class ValuegateError(Exception):
    """The base of valuegate's errors; raised as itself, a user error (bad input or config, exit 2).

    Attributes:
        exit_code (int): what ``valuegate`` exits with when this error ends a command.
    """

    exit_code = 2


class BadInput(ValuegateError):
    """Bad input or config (a file, row, column, setting or name): fix it and run again (exit 2)."""

    exit_code = 2


class GateFailed(ValuegateError):
    """The candidate release failed the gate's checks; it never becomes current (exit 3)."""

    exit_code = 3


class ClusterLost(ValuegateError):
    """The Dask or Ray cluster went away during a run; what was stored stays and a re-run resumes (exit 4)."""

    exit_code = 4


class NoSpace(ValuegateError):
    """The device being written is full (``OSError`` ENOSPC): one line saying what was being written (exit 5).
    Every write is atomic (a Lance commit, a temporary file renamed), so nothing half-written is visible and
    a re-run after freeing space resumes."""

    exit_code = 5


class DamagedTable(ValuegateError):
    """A table (or a release) of the workspace cannot be read: a truncated, zeroed or missing data file
    (exit 6). The line names the table and says to run ``valuegate verify``."""

    exit_code = 6


class StoreUnreachable(ValuegateError):
    """The object store of the workspace stopped answering (connections refused, reset or timed out) after
    every retry (exit 7). Every write is atomic, so what was committed stays and nothing half-written is
    visible; a re-run once the store is back resumes."""

    exit_code = 7


class InternalError(ValuegateError):
    """A broken invariant: a bug in valuegate, not in the input (exit 70, EX_SOFTWARE)."""

    exit_code = 70


#: exit code → the class, for the CLI's help and docs/configuration.md (the codes of ``valuegate``).
EXIT_CODES: dict[int, type[ValuegateError]] = {
    BadInput.exit_code: BadInput, GateFailed.exit_code: GateFailed, ClusterLost.exit_code: ClusterLost,
    NoSpace.exit_code: NoSpace, DamagedTable.exit_code: DamagedTable, StoreUnreachable.exit_code: StoreUnreachable,
    InternalError.exit_code: InternalError,
}
