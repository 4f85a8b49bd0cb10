"""The baseline contract (issue 30 item 3): a baseline added in one place (a function with ``@register``) is a
column of every scored frame (``valuegate score``, the stored scores table, a release's scores.parquet), a
``select.policy`` the settings accept, reason codes the select step writes, and a filter of the report's
detection table; the built-ins are registered the same way."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny import random_rows, write_jsonl

from valuegate.engine.baseline_registry import BaselineInputs, baseline_names, register, unregister
from valuegate.settings import load_settings


@pytest.fixture
def toy():
    """A toy baseline, registered in this one place: twice the counted tokens, keeping the longest."""

    @register("toy_twice", flags=-1.0, label="toy filter (drops short)", policy="toy", rank="longest")
    def toy_twice(x: BaselineInputs) -> np.ndarray:
        return 2.0 * np.asarray(x.n_tokens, dtype=np.float64)

    yield "toy_twice"
    unregister("toy_twice")


def test_the_builtins_are_registered_in_their_column_order():
    assert baseline_names()[:5] == ("perplexity", "length", "ifd", "rds_mean", "rds_max")


def test_a_registered_baseline_is_a_column_and_a_select_policy(toy, tmp_path, tiny_model_dir):
    from valuegate.dataset_card import score_columns
    from valuegate.engine.columns import sample_score_columns
    from valuegate.engine.detection import flag_sides
    from valuegate.file_scoring import score_files
    from valuegate.storage.schemas import current_scores_schema
    from valuegate.tasks.select import reason_codes

    assert toy in sample_score_columns() and toy in score_columns() and toy in current_scores_schema().names
    assert flag_sides()[toy] == (-1.0, "toy filter (drops short)")
    assert "not_in_longest_toy" in reason_codes()
    settings = load_settings(overrides={
        "model": {"name": str(tiny_model_dir()), "device": "cpu"},
        "extract": {"support_k": 4, "hidden_dim": 8, "template": "none"},
        "select": {"policy": "toy", "fraction": 0.5}})
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(8, seed=41))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(5, seed=42))
    df, _ = score_files(str(train), str(valid), settings, progress=False)
    assert df[toy].to_list() == [2.0 * n for n in df["n_tokens"].to_list()]
    kept = df.filter("keep")
    assert kept.height == math.ceil(0.5 * df.height)
    assert kept[toy].min() >= df.filter(~df["keep"])[toy].max()
    assert set(df.filter(~df["keep"])["reason_code"]) == {"not_in_longest_toy"}


def test_an_unknown_policy_is_one_line_naming_the_key_and_the_known_ones(toy):
    from valuegate.errors import ValuegateError

    assert load_settings(overrides={"select": {"policy": "toy"}}).select.policy == "toy"
    with pytest.raises(ValuegateError, match=r"^invalid settings: select\.policy: unknown policy 'lenght': use one "
                                             r"of suspect, .*length.*, random$") as err:
        load_settings(overrides={"select": {"policy": "lenght"}})
    assert "\n" not in str(err.value) and "toy" in str(err.value)
