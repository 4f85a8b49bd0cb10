"""Shared fixtures: tiny models per family (built once per session), tiny data files."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import pytest

# the shared test helpers (tiny.py, tiny_vlm.py, ...) and the test modules of every room import each other by
# plain name; the tests mirror the layout: engine/, inputs/, storage/, tasks/, flows/ and the shell's at the top
HERE = Path(__file__).parent
for folder in (HERE, *(HERE / room for room in ("engine", "inputs", "storage", "tasks", "flows"))):
    sys.path.insert(0, str(folder))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# `make test` runs the tests on every core (pytest-xdist, one worker per core, a group of tests per worker): each
# worker's torch, and the processes it starts, take their share of the cores (OpenMP threads beyond the cores
# spin against each other and slow every worker)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

from tiny import build_tiny_model, random_rows, write_jsonl  # noqa: E402  (found through the path above)


def pytest_runtest_setup(item):
    """Prefect's console handlers write where ``sys.stderr`` pointed when its logging was last set up: when that
    happened inside a test capturing its output (``capsys``), the stream is closed after it, and the next
    flow's first log line fails (``I/O operation on closed file``; in a flow that logs its prints, the
    traceback logging prints is logged again, to a RecursionError). Which test sets logging up first depends
    on the order, and so on the xdist worker: before each test's fixtures (a module's fixture may run a flow),
    a handler on a closed stream is pointed at the current ``sys.stderr`` (pytest's capture) again."""
    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for handler in (h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)):
        if getattr(handler.stream, "closed", False):  # (not setStream: it flushes the closed stream)
            handler.stream = handler.console.file = sys.stderr


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(family)`` → directory of a saved tiny model of that family."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(family: str = "llama-tied") -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get


@pytest.fixture
def data_files(tmp_path):
    """Small train/valid JSONL files of prompt/response samples."""
    train = write_jsonl(tmp_path / "train.jsonl", random_rows(9, seed=1))
    valid = write_jsonl(tmp_path / "valid.jsonl", random_rows(4, seed=2))
    return train, valid


pytest_plugins = ["s3server", "fault_plugin"]

# Tests that start real services or processes (a Prefect API server, a Dask/Ray cluster, the S3 test
# server, a browser, a fresh virtual environment, `valuegate run` as its own process) are marked
# `integration`; with the `slow` ones below they stay out of the fast tier (`make check`); `make test` runs
# everything.
INTEGRATION_FIXTURES = {"prefect_harness", "s3_server", "fault_spec"}
INTEGRATION_MODULES = {"test_processes", "test_server_ui", "test_runners", "test_wheel", "test_concurrent_runs",
                       "test_flow_faults", "test_release_crash", "test_release_cleanup"}


@pytest.fixture(scope="module")
def prefect_harness():
    """A Prefect API server for the module's tests (Prefect's own test harness, a real server on SQLite).

    Yields:
        str: its API URL (for `valuegate run` started as its own process: ``PREFECT_API_URL``).
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


# Tests left out of the fast tier (`make check`: -m "not integration and not slow"; `make test` runs them all),
# chosen from measured durations (`pytest -m "not integration" --durations=0`, 2 cores at load 8-13: the
# non-integration tests took 918 s, these 672 s of it): the real default model (every `default_model` test),
# several processes racing, property-based ingestion, a CLI subprocess, and the oracle checks on every model
# family but one (llama-tied stays in the fast tier; VLMs: llava). Paths relative to tests/.
SLOW_MODULES = {"engine/test_default_model_scoring.py", "storage/test_exactly_once.py",
                "storage/test_concurrent_writers.py"}
SLOW_TESTS = [re.compile(p) for p in (  # matched at the start of the test id relative to tests/
    r"tasks/test_ingest_property\.py::test_arbitrary_",
    r"storage/test_s3_release\.py::test_concurrent_promoters_are_serialised",
    r"engine/test_vlm_prefetch\.py::test_prefetch_gives_the_features_of_inline_encoding",
    r"flows/test_flow\.py::test_refresh_against_a_real_local_server",
    r"storage/test_store\.py::test_(concurrent_ingests_of_one_source_leave_each_row_once"
    r"|extract_resumes_after_a_crash_between_batches)",
    r"storage/test_lance_store\.py::test_concurrent_appends_from_processes",
    r"storage/test_release\.py::test_concurrent_allocation_never_collides",
    r"tasks/test_gate\.py::test_concurrent_and_repeated_runs_do_not_interfere",
    r"engine/test_forvalue\.py::test_sparse_close_to_exact_when_truncated_and_projected",
    r"engine/test_forvalue\.py::test_(phi_equals_autograd_head_gradient|sparse_equals_exact_on_full_support)"
    r"\[(?!(all-|response-)?llama-tied\])",
    r"engine/test_forvalue\.py::test_scores_do_not_depend_on_batching_order_or_padding_side\[exact\]",
    r"engine/test_vlm\.py::test_vlm_phi_equals_autograd_and_sparse_equals_exact\[(?!llava\])",
    r"test_cli\.py::test_score_subprocess_writes_table_and_summary",
    r"test_api\.py::test_every_input_kind_gives_the_cli_numbers",
)]


def _is_slow(item) -> bool:
    node = item.nodeid.removeprefix("tests/")
    return (node.split("::", 1)[0] in SLOW_MODULES or any(p.match(node) for p in SLOW_TESTS)
            or item.get_closest_marker("default_model") is not None)


# `make test` spreads the tests over the cores (pytest-xdist, `--dist loadgroup`). Each module is one group (its
# module-scoped Prefect harness starts once), but the modules that start Dask or Ray clusters form one group
# together, so no two clusters compete for the cores at once; and the longest groups start first (measured:
# docs/benchmarks.md#test-tiers), so that no worker is left alone with one at the end.
CLUSTER_MODULES = {"flows/test_runners.py", "flows/test_faults.py", "storage/test_scores_once.py"}
LONGEST_FIRST = ["test_wheel.py", "clusters", "test_layout.py", "flows/test_concurrent_runs.py",
                 "flows/test_processes.py", "test_run_output.py", "flows/test_flow_faults.py", "flows/test_flow.py"]


def _group(item) -> str:
    path = item.nodeid.removeprefix("tests/").split("::", 1)[0]
    return "clusters" if path in CLUSTER_MODULES else path


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda it: LONGEST_FIRST.index(g) if (g := _group(it)) in LONGEST_FIRST else len(LONGEST_FIRST))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module in INTEGRATION_MODULES or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if module == "test_report" and "chromium" in item.name:
            item.add_marker(pytest.mark.integration)
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
