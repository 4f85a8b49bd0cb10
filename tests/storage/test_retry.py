"""The one retry policy of storage/ (storage/retry.py, issue 17): what is retried, what is logged and counted,
what comes back when the attempts are used up."""

from __future__ import annotations

import pytest

from valuegate.errors import ValuegateError
from valuegate.storage.retry import RetryPolicy, call, classify_error

FAST = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=0.004)


def test_errors_retried_by_kind_with_a_log_line_and_a_hook_per_retry(caplog):
    caplog.set_level("INFO", logger="valuegate.storage.retry")
    calls, kinds, between = [], [], []

    def flaky() -> str:
        calls.append(len(between))
        if len(calls) < 3:
            raise RuntimeError("lance error: Commit conflict for version 2\ndebug dump")
        return "done"

    assert call(flaky, what="append to t", policy=FAST, on_retry=kinds.append,
                before_retry=lambda: between.append(1)) == "done"
    assert calls == [0, 1, 2]  # the hook runs before every attempt but the first
    assert kinds == ["conflict", "conflict"]
    lines = [m for m in caplog.messages if m.startswith("append to t: conflict on attempt")]
    assert len(lines) == 2 and all(m.endswith("Commit conflict for version 2") for m in lines)


def test_not_retryable_and_exhausted_errors_propagate_as_raised(caplog):
    n = []

    def bad() -> None:
        n.append(1)
        raise ValuegateError("commit conflict in a config error")  # never retried, whatever it says

    with pytest.raises(ValuegateError):
        call(bad, what="x", policy=FAST)
    assert len(n) == 1

    def down() -> None:
        n.append(1)
        raise OSError("connection refused")

    with pytest.raises(OSError, match="connection refused"):
        call(down, what="get k", policy=FAST)
    assert len(n) == 1 + FAST.attempts
    assert any(m.startswith("get k: giving up after 4 attempts (transient)") for m in caplog.messages)


def test_results_retried_and_the_last_one_returned():
    seen = []

    def lose() -> bool:
        seen.append(1)
        return len(seen) >= 3

    assert call(lose, what="cas", policy=FAST, result_kind=lambda ok: None if ok else "lost") is True
    assert len(seen) == 3
    seen.clear()
    assert call(lambda: seen.append(1) or False, what="cas", policy=FAST,
                result_kind=lambda ok: None if ok else "lost") is False
    assert len(seen) == FAST.attempts


def test_policy_and_classification():
    assert all(0.0005 <= FAST.delay_s(1) <= 0.001 for _ in range(20))
    assert all(FAST.delay_s(10) <= 0.004 for _ in range(20))
    assert RetryPolicy(base_delay_s=0).delay_s(3) == 0
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    # obstore: the first line is read, not the debug dump where every HTTP failure is a RetryError
    assert classify_error(OSError("Object at location k not found\nsource: RetryError(...)"),
                          message="Object at location k not found") is None
    assert classify_error(OSError("x"), message="Error performing GET - HTTP error: error sending request") == "transient"
    assert classify_error(KeyError("timeout"), (OSError,)) is None
