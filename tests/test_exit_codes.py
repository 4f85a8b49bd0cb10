"""Named errors and their exit codes (issue 17): bad input 2, a failed gate 3, a lost cluster 4, a broken
invariant 70; each one line on stderr, none retried by a Prefect task, and the gate's failure reaches the CLI
through Prefect as GateFailed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prefect.states import Failed
from tiny import run_config

from valuegate import cli
from valuegate.errors import BadInput, ClusterLost, GateFailed, InternalError, ValuegateError
from valuegate.flows.user_errors import retry_unless_user_error

NAMED = [BadInput, GateFailed, ClusterLost, InternalError]


def test_each_named_error_has_its_own_exit_code_and_is_a_valuegate_error():
    assert [c.exit_code for c in NAMED] == [2, 3, 4, 70]
    assert all(issubclass(c, ValuegateError) for c in NAMED)
    assert ValuegateError.exit_code == 2  # a plain ValuegateError is bad input, as it always was
    assert not issubclass(GateFailed, BadInput) and not issubclass(InternalError, BadInput)


@pytest.mark.parametrize("error", [ValuegateError, *NAMED])
def test_no_named_error_is_retried_by_a_task(error):
    assert retry_unless_user_error(None, None, Failed(data=error("x"))) is False
    assert retry_unless_user_error(None, None, Failed(data=OSError("disk gone"))) is True


@pytest.mark.parametrize("error", [ValuegateError, BadInput, GateFailed, ClusterLost])
def test_the_cli_exits_with_the_code_of_the_error_in_one_line(error, monkeypatch, capsys):
    def fails(args):
        raise error("release r/v0002: min_retained_fraction 0.5 > 0.4")

    monkeypatch.setattr(cli, "_cmd_fetch_model", fails)
    assert cli.main(["fetch-model"]) == error.exit_code
    err = capsys.readouterr().err
    assert err == "valuegate: error: release r/v0002: min_retained_fraction 0.5 > 0.4\n"


@pytest.mark.parametrize("error", [InternalError, AssertionError])
def test_a_broken_invariant_exits_70_with_its_traceback_and_one_error_line(error, monkeypatch, capsys):
    def fails(args):
        raise error("scores run 7 holds 3 rows for 4 samples")

    monkeypatch.setattr(cli, "_cmd_fetch_model", fails)
    assert cli.main(["fetch-model"]) == 70
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and "in fails" in "\n".join(err)
    assert err[-1] == ("valuegate: error: internal error: scores run 7 holds 3 rows for 4 samples (a bug in "
                       "valuegate; please report it with the traceback above)")


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for code in ("2 ", "3 ", "4 ", "70 "):
        assert f"\n  {code}" in out
    assert "the gate failed" in out and "internal error" in out


def test_the_lost_cluster_error_is_cluster_lost(tmp_path):
    from valuegate.flows.refresh import _cluster_lost_error
    from valuegate.settings import load_settings

    settings = load_settings(None, {"workspace": str(tmp_path / "ws"), "runner": {"kind": "dask"}})
    exc = _cluster_lost_error(settings, {"shards": [["a", "b"]], "model_fp": "f"}, ConnectionError("gone"))
    assert isinstance(exc, ClusterLost) and "\n" not in str(exc)
    assert str(exc).startswith("lost the dask cluster (local cluster of 2 workers) during sharded extraction")


def test_a_failed_gate_exits_3_through_prefect(prefect_harness, tmp_path, tiny_model_dir):
    """`valuegate run` as its own process: the gate (retention 0.9 asked, 0.75 kept, set by a flag derived
    from the settings model) fails in the flow, Prefect hands GateFailed back, the CLI exits 3."""
    config = run_config(tmp_path, tiny_model_dir(), relative=True,
                        select={"policy": "top_fraction", "fraction": 0.75})
    proc = subprocess.run([sys.executable, "-m", "valuegate.cli", "run", "--quiet", "--config", str(config),
                           "--gate.min-retained-fraction", "0.9"], env={**os.environ, "PREFECT_API_URL": prefect_harness},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == GateFailed.exit_code, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("valuegate: error: gate failed for release r/v0001 (current stays none): "), last
    assert "retained" in last and proc.stdout == ""


def test_an_unreachable_store_is_retried_by_a_task_and_exits_7_in_one_line(monkeypatch, capsys):
    from valuegate.errors import StoreUnreachable

    assert StoreUnreachable.exit_code == 7 and issubclass(StoreUnreachable, ValuegateError)
    assert retry_unless_user_error(None, None, Failed(data=StoreUnreachable("x"))) is True  # it may be back

    def fails(args):  # what pyarrow raises once its own retries gave up, met outside the workspace's calls
        raise OSError("When getting information for key 'ws/x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                      "HeadObject operation: curlCode: 7, Could not connect to server; Details: Failed to connect "
                      "to 10.0.0.9:9000 after 0 ms: Could not connect to server")

    monkeypatch.setattr(cli, "_cmd_fetch_model", fails)
    assert cli.main(["fetch-model"]) == 7
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("valuegate: error: the object store at 10.0.0.9:9000 did not "
                                                   "answer after every retry (When getting information"), err


def test_an_error_kind_is_data_that_the_edge_reads_never_its_words(monkeypatch, capsys):
    """Issue 30: the exit code, the retry and the traceback come from the class's kind
    (valuegate.errors.ErrorKind), not from its message: a new error class declares a kind and is done."""
    from valuegate.errors import EXIT_CODES, KINDS, STORE_UNREACHABLE, kind_of

    assert [k.exit_code for k in KINDS] == sorted(EXIT_CODES) and all(EXIT_CODES[k.exit_code].kind is k for k in KINDS)
    assert kind_of(AssertionError("x")) is InternalError.kind and kind_of(OSError("x")) is None

    class Elsewhere(ValuegateError):  # a new kind of error: one class naming its kind
        kind = STORE_UNREACHABLE

    assert Elsewhere.exit_code == 7 and retry_unless_user_error(None, None, Failed(data=Elsewhere("x"))) is True

    def fails(args):  # words that name another kind change nothing
        raise Elsewhere("internal error: gate failed for release r/v0002")

    monkeypatch.setattr(cli, "_cmd_fetch_model", fails)
    assert cli.main(["fetch-model"]) == 7
    assert capsys.readouterr().err == "valuegate: error: internal error: gate failed for release r/v0002\n"
