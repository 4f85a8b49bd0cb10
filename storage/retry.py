"""The one retry policy of the storage layer: bounded attempts, exponential backoff with jitter (tenacity).

Every retry under ``storage/`` goes through :func:`call` with a :class:`RetryPolicy`:

* :class:`valuegate.storage.lance.Workspace` — LanceDB commits that lost against a concurrent writer and
  transient object-store errors (``Workspace(retry=...)``, default :class:`RetryPolicy`), the table moved to
  its latest version between attempts;
* :mod:`valuegate.storage.objstore` — the single S3 requests of the release protocol
  (:data:`S3_REQUESTS`: transport failures, ``5xx``, ``SlowDown``);
* :func:`valuegate.storage.releases.promote` — the compare-and-swap of ``CURRENT`` that another promoter
  won (:data:`COMPARE_AND_SWAP`: retried on the result, not on an error).

Above these, Prefect's task retries rerun a whole step; inside Lance, ``merge_insert`` rebases its own
conflicts. Which errors are worth another attempt is :func:`classify_error` (one list of message markers:
LanceDB and obstore report object-store failures through the same Rust ``object_store`` crate).

This module never imports torch or LanceDB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

import tenacity
from tenacity import wait_exponential, wait_random_exponential

from valuegate.errors import ValuegateError

__all__ = ["COMPARE_AND_SWAP", "S3_REQUESTS", "RetryPolicy", "call", "classify_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Messages (lower-cased) of the commit failures that are safe to retry after moving to the latest version.
_CONFLICT_MARKERS = (
    "commit conflict",  # "Commit conflict for version N" and "Retryable commit conflict for version N"
    "incompatible transaction",  # e.g. an append racing an overwrite
    "concurrent transaction",  # "... was preempted by / removed by a concurrent transaction"
    "too many concurrent writ",  # "Too many concurrent writers" / "Too many concurrent writes for ..."
    "failed to commit the transaction after",
)
# Transport failures of the object store that a later attempt may not meet.
_TRANSIENT_MARKERS = (
    "retryerror",
    "connection refused",
    "could not connect",  # pyarrow's AWS SDK: "curlCode: 7, Could not connect to server"
    "network_connection",  # pyarrow's AWS SDK: "AWS Error NETWORK_CONNECTION during ..."
    "connectionrefused",
    "connection reset",
    "connectionreset",
    "broken pipe",
    "tcp connect error",
    "error sending request",
    "timed out",
    "timeout",
    "slowdown",
    "slow down",
    "service unavailable",
    "internalerror",
    "500 internal server error",
    "502 bad gateway",
    "503",
    "504 gateway",
)
# Configuration errors that look like I/O but never heal by waiting.
_PERMANENT_MARKERS = (
    "nosuchbucket",
    "accessdenied",
    "access denied",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "403 forbidden",
)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    Attempt ``i`` (1-based) that fails waits ``d/2 + uniform(0, d/2)`` seconds before the next, with
    ``d = min(max_delay_s, base_delay_s * 2**(i-1))`` (tenacity's ``wait_exponential`` plus
    ``wait_random_exponential``, each on half the range).

    Attributes:
        attempts: total attempts, first included (≥ 1).
        base_delay_s: backoff before the second attempt, in seconds.
        max_delay_s: cap on one backoff, in seconds.
    """

    attempts: int = 8
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def wait(self) -> tenacity.wait.wait_base:
        """The tenacity wait strategy of this policy."""
        half_base, half_max = self.base_delay_s / 2, self.max_delay_s / 2
        return (wait_exponential(multiplier=half_base, max=half_max)
                + wait_random_exponential(multiplier=half_base, max=half_max))

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): one draw of :meth:`wait`."""
        return self.wait()(SimpleNamespace(attempt_number=attempt))


S3_REQUESTS = RetryPolicy(attempts=4, base_delay_s=0.2, max_delay_s=1.6)
"""One S3 request of :mod:`valuegate.storage.objstore` (transport failures, ``5xx``, ``SlowDown``)."""

COMPARE_AND_SWAP = RetryPolicy(attempts=200, base_delay_s=0.01, max_delay_s=0.5)
"""A read-modify-write of one object that other writers may win (``CURRENT`` of a release name)."""


def classify_error(exc: BaseException,
                   types: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError),
                   message: str | None = None) -> str | None:
    """Whether an exception from the store is worth retrying.

    Args:
        exc: the exception an attempt raised.
        types: the exception types that may be store failures (LanceDB raises RuntimeError/ValueError/
            OSError; obstore its own ``BaseError`` subclasses); any other type is never retried.
        message: the text to read instead of ``str(exc)`` (obstore: the first line, without the debug
            dump, in which every HTTP failure shows as a ``RetryError``).

    Returns:
        ``"conflict"`` for a commit that lost against a concurrent writer (safe to redo from the
        latest version), ``"transient"`` for an object-store transport failure, ``None`` otherwise
        (bad input, missing table, wrong credentials or bucket: retrying would not help).
    """
    if not isinstance(exc, types) or isinstance(exc, ValuegateError):
        return None
    msg = (str(exc) if message is None else message).lower()
    if any(m in msg for m in _CONFLICT_MARKERS):
        return "conflict"
    if any(m in msg for m in _PERMANENT_MARKERS):
        return None
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(m in msg for m in _TRANSIENT_MARKERS):
        return "transient"
    return None


def _first_line(x: Any) -> str:
    text = str(x)
    return text.splitlines()[0] if text else repr(x)


def call(fn: Callable[[], T], *, what: str, policy: RetryPolicy,
         error_kind: Callable[[BaseException], str | None] = classify_error,
         result_kind: Callable[[T], str | None] | None = None,
         on_retry: Callable[[str], None] | None = None,
         before_retry: Callable[[], None] | None = None) -> T:
    """Run ``fn`` under ``policy``.

    Args:
        fn: one attempt, no arguments.
        what: what is tried, for the log line of each retry (``"<what>: <kind> on attempt <n>, retrying
            in <s>s: <why>"``, level INFO; a WARNING when the attempts are used up on an error).
        policy: attempts and backoff.
        error_kind: the kind of an exception worth another attempt (e.g. ``"conflict"``), ``None``: it
            propagates at once.
        result_kind: the kind of a result that asks for another attempt (e.g. ``"lost race"``), ``None``:
            it is returned. Not given: every result is returned.
        on_retry: called with the kind before each retry (e.g. to count retries).
        before_retry: called after the backoff, before each attempt but the first (e.g. to move a table
            handle to its latest version).

    Returns:
        the result of the first attempt that is not retried; when the attempts are used up, the last
        attempt's result (a ``result_kind`` retry) or its exception, as raised.
    """

    def kind_of(state: tenacity.RetryCallState) -> str | None:
        outcome = state.outcome
        if outcome.failed:
            return error_kind(outcome.exception())
        return result_kind(outcome.result()) if result_kind is not None else None

    def before_sleep(state: tenacity.RetryCallState) -> None:
        kind = kind_of(state) or "retry"
        if on_retry is not None:
            on_retry(kind)
        outcome = state.outcome
        why = outcome.exception() if outcome.failed else outcome.result()
        log.info("%s: %s on attempt %d, retrying in %.2fs: %s", what, kind, state.attempt_number,
                 state.upcoming_sleep, _first_line(why))

    def give_up(state: tenacity.RetryCallState) -> Any:
        outcome = state.outcome
        if outcome.failed:
            log.warning("%s: giving up after %d attempts (%s): %s", what, state.attempt_number,
                        kind_of(state), _first_line(outcome.exception()))
        return outcome.result()  # the last result, or the last exception raised again

    def before(state: tenacity.RetryCallState) -> None:
        if state.attempt_number > 1 and before_retry is not None:
            before_retry()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=policy.wait(),
        retry=tenacity.retry_if_exception(lambda e: error_kind(e) is not None)
        | tenacity.retry_if_result(lambda r: result_kind is not None and result_kind(r) is not None),
        before=before,
        before_sleep=before_sleep,
        retry_error_callback=give_up,
        reraise=True,
    )
    return retrying(fn)
