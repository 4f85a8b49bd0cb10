"""Shared fixtures: tiny models per family (built once per session), tiny data files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# the shared test helpers (tiny.py, tiny_vlm.py, ...) and the test modules of every room import each other by
# plain name; the tests mirror the layout: engine/, inputs/, storage/, tasks/, flows/ and the shell's at the top
HERE = Path(__file__).parent
for folder in (HERE, *(HERE / room for room in ("engine", "inputs", "storage", "tasks", "flows"))):
    sys.path.insert(0, str(folder))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from tiny import build_tiny_model, random_rows, write_jsonl  # noqa: E402  (found through the path above)


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
# `integration`, so that `pytest -m "not integration"` is the fast loop; `make test` runs everything.
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


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module in INTEGRATION_MODULES or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if module == "test_report" and "chromium" in item.name:
            item.add_marker(pytest.mark.integration)
