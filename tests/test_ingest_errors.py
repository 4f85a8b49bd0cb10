"""Ingestion's user errors and edge cases (issue 15): a missing source is one line (``ingest`` and ``run``,
never retried), a UTF-8 BOM is accepted, and
a chat row without an assistant turn is quarantined with its reason."""

from __future__ import annotations

import json

import pytest
from test_flow import _config, prefect_harness  # noqa: F401  (the session's Prefect test harness)
from tiny import random_rows, write_jsonl

from valuegate.cli import EXIT_USER_ERROR, main
from valuegate.errors import ValuegateError
from valuegate.storage import samples as sstore
from valuegate.storage.lance import Workspace
from valuegate.tasks.ingest import ingest_file, read_samples


@pytest.fixture
def ws(tmp_path):
    w = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(w)
    return w


def _one_error_line(err: str, expected: str) -> None:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("valuegate: error:")]
    assert lines == [expected], err


# ---- a missing source file -------------------------------------------------------------------------


def test_ingest_of_a_missing_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    rc = main(["ingest", "d", str(missing), "--workspace", str(tmp_path / "ws"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR
    _one_error_line(err, f"valuegate: error: {missing}: no such file")
    assert err.strip().splitlines() == [f"valuegate: error: {missing}: no such file"]


def test_ingest_file_of_a_missing_file_raises_a_user_error(ws, tmp_path):
    with pytest.raises(ValuegateError, match=r"missing\.jsonl: no such file$"):
        ingest_file(ws, "d", tmp_path / "missing.jsonl", 10_000)


def test_run_with_a_missing_source_fails_once_with_one_line(prefect_harness, tiny_model_dir, tmp_path,  # noqa: F811
                                                            capsys):
    from prefect.client.orchestration import get_client

    from valuegate.flows.refresh import refresh

    missing = tmp_path / "missing.jsonl"
    cfg = _config(tmp_path, tiny_model_dir(), data={"sources": [str(missing)]})
    state = refresh(config=cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValuegateError, match="no such file"):  # the task's own error, not a wrapper
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.request("POST", "/task_runs/filter", json={"flow_runs": {
            "id": {"any_": [str(state.state_details.flow_run_id)]}}}).json()
    ingest = [r for r in runs if r["task_key"].startswith("ingest") or r["name"].startswith("ingest")]
    assert len(ingest) == 1 and ingest[0]["run_count"] == 1, [(r["name"], r["run_count"]) for r in runs]

    capsys.readouterr()
    rc = main(["run", "--config", cfg])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR
    _one_error_line(err, f"valuegate: error: {missing}: no such file")


# ---- a UTF-8 BOM -----------------------------------------------------------------------------------


def test_a_utf8_bom_at_the_start_of_a_jsonl_file_is_accepted(ws, tmp_path):
    rows = random_rows(3, seed=3)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    rep = ingest_file(ws, "d", bom, 10_000)
    assert (rep.rows, rep.kept, rep.quarantined) == (3, 3, 0)
    members = sorted(sstore.read_members(ws, "d").to_pylist(), key=lambda m: m["row"])
    assert [json.loads(m["metadata"])["tag"] for m in members] == ["r0", "r1", "r2"]
    # the same ids as without the BOM, and the score path's reader agrees
    _, samples = read_samples(bom)
    assert [s.prompt for s in samples] == [r["prompt"] for r in rows]
    assert rep.duplicates == 0 and ingest_file(ws, "d", plain, 10_000).duplicates == 3
    # a BOM on a line of its own is an empty line
    bom.write_bytes(b"\xef\xbb\xbf\n" + plain.read_bytes())
    assert ingest_file(ws, "e", bom, 10_000).kept == 3


# ---- rows that can never be valued -----------------------------------------------------------------


def test_a_chat_without_an_assistant_turn_is_quarantined_with_its_reason(ws, tmp_path):
    rows = random_rows(3, seed=6, kind="messages")
    rows.append({"messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}],
                 "tag": "no-answer"})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    rep = ingest_file(ws, "d", path, 10_000)
    assert (rep.rows, rep.kept, rep.quarantined) == (4, 3, 1)
    assert rep.reasons == {"messages: no assistant turn": 1}
    q = sstore.read_quarantine(ws, "d").to_pylist()
    assert [(r["row"], r["reason"], r["source"]) for r in q] == [(3, "messages: no assistant turn",
                                                                 str(path.resolve()))]
    assert "no-answer" in q[0]["raw"]


def test_a_prompt_response_row_with_an_empty_response_is_quarantined(ws, tmp_path):
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "w1 ", "response": "w2"},
                                                {"prompt": "w1 ", "response": ""},
                                                {"prompt": "w1 ", "response": " \n "}])
    rep = ingest_file(ws, "d", path, 10_000)
    assert (rep.kept, rep.quarantined, rep.reasons) == (1, 2, {"response: empty": 2})
