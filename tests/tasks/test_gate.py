"""The gate: a passing candidate, and a candidate failing each Great Expectations check on its own."""

from __future__ import annotations

import socket
import threading

import polars as pl
import pytest

from valuegate.errors import ValuegateError
from valuegate.settings import GateSettings
from valuegate.tasks.gate import SUITE_PREFIX, GateInput, gate_frames, run_gate

N = 40  # scored rows: groups a (odd) and b (even), 20 each


def _scored() -> pl.DataFrame:
    return pl.DataFrame({
        "id": [f"s{i:02d}" for i in range(N)],
        "value": [float(i) for i in range(N)],
        "family": ["a" if i % 2 else "b" for i in range(N)],
        "prompt": [f"prompt {i}" for i in range(N)],
    })


def _input(**changes) -> GateInput:
    """A candidate that passes every check: the 30 highest valued rows (0.75 kept, both groups 0.75)."""
    scored = _scored()
    base = {"candidate": scored.filter(pl.col("value") >= 10), "scored": scored, "group_by": "family",
            "ingested_rows": 45, "quarantined_rows": 5, "valset": "val@v3", "valset_rows": 5}
    return GateInput(**{**base, **changes})


def _candidate(fn) -> pl.DataFrame:
    return fn(_input().candidate)


def _set_value(cand: pl.DataFrame, row_id: str, v: float) -> pl.DataFrame:
    return cand.with_columns(pl.when(pl.col("id") == row_id).then(v).otherwise(pl.col("value")).alias("value"))


def test_passing_candidate_writes_data_docs_and_stays_offline(tmp_path, monkeypatch):
    attempts = []

    def refuse(sock, address, *args):
        if sock.family != getattr(socket, "AF_UNIX", None):
            attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    res = run_gate(_input(), GateSettings(), tmp_path / "docs")

    assert res.passed is True and res.failures == [], res.failures
    names = [r["name"] for r in res.results]
    assert len(names) == len(set(names)) == 10
    assert all(r["success"] for r in res.results)
    assert res.metrics["retained_fraction"] == pytest.approx(0.75)
    assert res.docs_index is not None and res.docs_index.is_file()
    assert res.docs_index == tmp_path / "docs" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    html = res.docs_index.read_text()
    for frame in ("candidate", "release_metrics", "group_retention"):
        assert SUITE_PREFIX + frame in html
    assert attempts == [], f"GX tried to reach the network: {attempts}"
    assert res.as_dict()["docs_index"] == str(res.docs_index)


CASES = {
    "duplicate id": ({"candidate": _candidate(lambda c: pl.concat([c, c.head(1)]))}, {},
                     "expect_column_values_to_be_unique(id)"),
    "null id": ({"candidate": _candidate(lambda c: c.with_columns(
        pl.when(pl.col("value") == 12).then(None).otherwise(pl.col("id")).alias("id")))}, {},
                "expect_column_values_to_not_be_null(id)"),
    "NaN value": ({"candidate": _candidate(lambda c: _set_value(c, "s12", float("nan")))}, {},
                  "expect_column_values_to_not_be_null(value)"),
    "inf value": ({"candidate": _candidate(lambda c: _set_value(c, "s12", float("inf")))}, {},
                  "expect_column_values_to_be_between(value)"),
    "-inf value": ({"candidate": _candidate(lambda c: _set_value(c, "s12", float("-inf")))}, {},
                   "expect_column_values_to_be_between(value)"),
    "missing column": ({"candidate": _candidate(lambda c: c.drop("value"))}, {},
                       "expect_table_columns_to_match_set(id, value)"),
    "too few retained": ({"candidate": _scored().filter(pl.col("value") >= 30)}, {},
                         "expect_column_values_to_be_between(retained_fraction)"),
    "too many retained": ({}, {"max_retained_fraction": 0.7},
                          "expect_column_values_to_be_between(retained_fraction)"),
    "group below floor": ({"candidate": _scored().filter((pl.col("family") == "b") | (pl.col("value") >= 36))},
                          {}, "expect_column_values_to_be_between(retention)"),
    "quarantine rate": ({"quarantined_rows": 20}, {}, "expect_column_values_to_be_between(quarantine_rate)"),
    "unpinned valset": ({"valset": "val"}, {}, "expect_column_values_to_match_regex(valset)"),
    "no valset": ({"valset": ""}, {}, "expect_column_values_to_match_regex(valset)"),
    "empty valset": ({"valset_rows": 0}, {}, "expect_column_values_to_be_between(valset_rows)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_check_fails_on_its_own(case, tmp_path):
    changes, settings, expected = CASES[case]
    res = run_gate(_input(**changes), GateSettings(**settings), tmp_path / "docs")

    assert res.passed is False
    assert len(res.failures) == 1 and res.failures[0].startswith(expected + ":"), res.failures
    failed = [r["name"] for r in res.results if not r["success"]]
    assert failed == [expected]
    assert res.docs_index is not None and res.docs_index.is_file()


def test_failure_lines_say_what_was_observed_and_the_bound(tmp_path):
    res = run_gate(_input(candidate=_scored().filter((pl.col("family") == "b") | (pl.col("value") >= 36)),
                          quarantined_rows=20), GateSettings(), tmp_path)
    group_line, quarantine_line = sorted(res.failures, key=lambda f: "quarantine" in f)
    assert "a (0.1)" in group_line and "b (" not in group_line and ">= 0.2" in group_line
    assert "0.4444 (20 of 45 ingested rows quarantined)" in quarantine_line and "<= 0.2" in quarantine_line
    group = next(r for r in res.results if r["name"].endswith("(retention)"))
    assert group["observed"]["failing_groups"] == {"a": pytest.approx(0.1)}


def test_concurrent_and_repeated_runs_do_not_interfere(tmp_path):
    results = {}

    def gate(key, inp):
        results[key] = run_gate(inp, GateSettings(), tmp_path / key)

    threads = [threading.Thread(target=gate, args=("a", _input())),
               threading.Thread(target=gate, args=("b", _input(valset="val")))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = run_gate(_input(quarantined_rows=20), GateSettings(), tmp_path / "a")  # same docs_dir again

    assert results["a"].passed is True and results["b"].passed is False
    assert [f.split(":")[0] for f in results["b"].failures] == ["expect_column_values_to_match_regex(valset)"]
    assert [f.split(":")[0] for f in again.failures] == ["expect_column_values_to_be_between(quarantine_rate)"]
    assert again.docs_index == results["a"].docs_index != results["b"].docs_index
    runs_a = list((tmp_path / "a" / "gx" / "uncommitted" / "validations" / (SUITE_PREFIX + "candidate")).rglob(
        "*.json"))
    runs_b = list((tmp_path / "b" / "gx" / "uncommitted" / "validations" / (SUITE_PREFIX + "candidate")).rglob(
        "*.json"))
    assert len(runs_a) == 2 and len(runs_b) == 1


def test_without_group_by_and_without_groups_column():
    frames = gate_frames(_input(group_by=None))
    assert set(frames) == {"candidate", "release_metrics"}
    assert list(frames["candidate"].columns) == ["id", "value"]
    with pytest.raises(ValuegateError, match="group_by column 'lang'"):
        gate_frames(_input(group_by="lang"))


@pytest.mark.parametrize("changes", [{"scored": _scored().head(0), "candidate": _scored().head(0)},
                                     {"ingested_rows": 0, "quarantined_rows": 0}])
def test_nothing_to_divide_by_is_a_user_error(changes):
    with pytest.raises(ValuegateError, match="nothing was scored or ingested"):
        gate_frames(_input(**changes))
