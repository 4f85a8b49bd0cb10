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
70      :class:`InternalError`  a broken invariant (a bug in valuegate); EX_SOFTWARE of sysexits.h
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


class InternalError(ValuegateError):
    """A broken invariant: a bug in valuegate, not in the input (exit 70, EX_SOFTWARE)."""

    exit_code = 70


#: exit code → the class, for the CLI's help and docs/configuration.md (the codes of ``valuegate``).
EXIT_CODES: dict[int, type[ValuegateError]] = {
    BadInput.exit_code: BadInput, GateFailed.exit_code: GateFailed, ClusterLost.exit_code: ClusterLost,
    InternalError.exit_code: InternalError,
}
