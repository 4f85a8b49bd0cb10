"""The test harness (tests/conftest.py ``pytest_runtest_setup``): Prefect's logging set up again inside a test
that captures its output leaves Prefect's console handlers on a stream closed after that test; the next test's
flow still logs (seen under pytest-xdist, where the order of the tests differs per worker)."""

from __future__ import annotations

from prefect import flow
from prefect.logging.configuration import setup_logging


def test_logging_set_up_again_inside_a_capturing_test(capsys):
    setup_logging(incremental=False)  # what a fresh Prefect import or an in-process server does
    print("captured")
    assert capsys.readouterr().out == "captured\n"


def test_a_flow_after_it_logs(prefect_harness):
    @flow(name="console-stream", log_prints=True)  # as refresh: a print is a log line
    def hello() -> int:
        print("hello")
        return 1

    assert hello() == 1
