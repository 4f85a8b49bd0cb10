"""How the flows treat valuegate's errors (:mod:`valuegate.errors`: bad input or config, a failed gate, a
lost cluster, a broken invariant; each deterministic): never retried, and shown on the console as their one
line, without the traceback Prefect logs with them (an :class:`InternalError`, a bug, keeps its traceback)."""

from __future__ import annotations

import logging
from typing import Any

from valuegate.errors import ValuegateError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: False (end the task as failed now) when the failed ``state`` holds
    a :class:`ValuegateError`, which would only fail again; True for anything else (I/O, a lost worker,
    an object store that stopped answering: :class:`StoreUnreachable`) so the task's own retry policy
    applies."""
    try:
        state.result()
    except ValuegateError as exc:  # its kind says (an object store that stopped answering may be back)
        return exc.kind.retried
    except Exception:  # any other failure may be transient
        return True
    return True


class _NoUserErrorTraceback(logging.Filter):
    """Drops the traceback of a record whose exception is a :class:`ValuegateError` whose kind shows none (its message, which
    names the error, stays). On the console handler of the root logger only: Prefect's run loggers hand
    a record to their API handler (the UI keeps the traceback) before it propagates to the root."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ValuegateError) and not record.exc_info[1].kind.traceback:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install :class:`_NoUserErrorTraceback` on the root logger's Prefect console handlers (idempotent)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _NoUserErrorTraceback) for f in handler.filters):
            handler.addFilter(_NoUserErrorTraceback())
