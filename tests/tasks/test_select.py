"""Selection policies on hand-made scores: each decision and its reason."""

from __future__ import annotations

import polars as pl
import pytest

from valuegate.errors import ValuegateError
from valuegate.settings import SelectSettings
from valuegate.tasks.select import select_samples

SCORED = pl.DataFrame({
    "id": ["a", "b", "c", "d", "e"],
    "value": [0.5, -0.2, 0.1, 0.0, 2.0],
    "suspect": [0.4, 5.0, 3.0, 3.1, None],
    "fault": ["garbled", "garbled", None, "cut", None],
    "suspect_reason": ["the answer has words that make no sense", "the answer has words that make no sense", None,
                       "the answer stops before it is finished", None],
})


def _keep(**cfg) -> list[bool]:
    return select_samples(SCORED, SelectSettings(**cfg))["keep"].to_list()


def test_each_policy_keeps_what_it_says():
    assert _keep(policy="drop_negative") == [True, False, True, True, True]
    assert _keep(policy="threshold", threshold=0.1) == [True, False, True, False, True]
    assert _keep(policy="top_fraction", fraction=0.4) == [True, False, False, False, True]
    assert _keep(policy="keep_all") == [True] * 5
    # suspect: ≤ threshold kept; a missing score is never kept silently
    assert _keep(policy="suspect", suspect_threshold=3.0) == [True, False, True, False, False]


def test_suspect_reason_says_the_fault_in_words_and_as_a_code():
    from valuegate.tasks.select import dropped_reason_counts

    cfg = SelectSettings(policy="suspect", suspect_threshold=3.0)
    out = select_samples(SCORED, cfg)
    assert out["reason"][1] == "the answer has words that make no sense (garbled: suspect 5 > 3)"
    assert out["reason"][3] == "the answer stops before it is finished (cut: suspect 3.1 > 3)"
    assert out["reason"][0] == "" and out["reason_code"].to_list() == ["", "garbled", "", "cut", "suspect"]
    # a row without a score is dropped, never silently kept, with a code of its own
    assert out["reason"][4].endswith("(suspect: suspect inf > 3)")
    assert dropped_reason_counts(out, cfg) == {"cut: the answer stops before it is finished": 1,
                                          "garbled: the answer has words that make no sense": 1,
                                          "suspect: unlike the validation set": 1}


def test_every_policy_writes_reason_codes_from_the_vocabulary():
    from valuegate.tasks.select import reason_codes

    for cfg in ({"policy": "drop_negative"}, {"policy": "threshold", "threshold": 0.1},
                {"policy": "top_fraction", "fraction": 0.4}, {"policy": "random", "fraction": 0.4},
                {"policy": "keep_all"}):
        out = select_samples(SCORED, SelectSettings(**cfg))
        codes = set(out["reason_code"].to_list()) - {""}
        assert codes <= set(reason_codes()), (cfg, codes)
        assert (out["reason_code"] == "").to_list() == out["keep"].to_list()


def test_top_fraction_ties_are_broken_by_id_and_errors_are_clear():
    tied = pl.DataFrame({"id": ["z", "y", "x"], "value": [1.0, 1.0, 1.0]})
    assert select_samples(tied, SelectSettings(policy="top_fraction", fraction=0.5))["keep"].to_list() == \
        [False, True, True]
    with pytest.raises(ValuegateError, match="not finite"):
        select_samples(pl.DataFrame({"id": ["a"], "value": [float("nan")]}), SelectSettings(policy="keep_all"))
    with pytest.raises(ValuegateError, match="suspect score"):
        select_samples(tied, SelectSettings(policy="suspect"))


def test_a_group_by_column_the_data_lacks_is_refused_before_extraction(tmp_path):
    """Issue 28: said right after ingest (the flow calls this before the extract step), with the columns."""
    from tiny import random_rows, write_jsonl

    from valuegate.settings import Settings
    from valuegate.storage.lance import Workspace
    from valuegate.storage.samples import ensure_sample_tables
    from valuegate.tasks.ingest import ingest_file
    from valuegate.tasks.select import check_group_by

    rows = random_rows(6, seed=1)
    for i, r in enumerate(rows):
        r["family"] = "ab"[i % 2]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    ws = Workspace(str(tmp_path / "ws"))
    ensure_sample_tables(ws)
    ingest_file(ws, "d", src, 10_000)

    def settings(group_by):
        return Settings(workspace=str(tmp_path / "ws"), data={"dataset": "d"}, select={"group_by": group_by})

    check_group_by(settings("family"))
    check_group_by(settings("source"))  # a column of every row
    with pytest.raises(ValuegateError, match=r"select.group_by = 'familly': no row of dataset 'd' has that column "
                                             r"\(its columns: .*family, tag\)"):
        check_group_by(settings("familly"))


def test_reason_kinds_come_from_the_codes_never_from_the_words():
    """A reason is data (valuegate.reasons): the counts are rendered from ``reason_code`` and the policy, so
    words that say something else do not change them; the words are the same reason with the numbers."""
    from valuegate.reasons import Reason
    from valuegate.tasks.select import dropped_reason_counts

    for kw, want in (({"policy": "drop_negative"}, {"value < 0"}),
                     ({"policy": "threshold", "threshold": 0.1}, {"value < threshold 0.1"}),
                     ({"policy": "top_fraction", "fraction": 0.4}, {"not in the top 40%"}),
                     ({"policy": "random", "fraction": 0.4}, {"not in the random 40%"}),
                     ({"policy": "suspect", "suspect_threshold": 3.0},
                      {"cut: the answer stops before it is finished", "suspect: unlike the validation set",
                       "garbled: the answer has words that make no sense"})):
        cfg = SelectSettings(**kw)
        out = select_samples(SCORED, cfg)
        counts = dropped_reason_counts(out, cfg)
        assert set(counts) == want, (kw, counts)
        assert dropped_reason_counts(out.with_columns(pl.lit("something else").alias("reason")), cfg) == counts
        assert dropped_reason_counts(out, cfg.model_dump(mode="json")) == counts  # a manifest's policy
        assert dropped_reason_counts(out, {"policy": cfg.policy, **kw}) == counts  # one that lacks the others
    assert Reason("negative_value", {"value": -0.25}).words() == "value -0.25 < 0"
    assert Reason("negative_value", {"value": -0.25}).kind() == "value < 0"
