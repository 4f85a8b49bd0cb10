"""Shared fixtures: tiny models per family (built once per session), tiny data files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from tiny import build_tiny_model, random_rows, write_jsonl


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
