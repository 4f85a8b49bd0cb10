"""The LanceDB workspace (storage/lance.py), on local disk and on the moto S3 server (`s3_server`)."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import pickle
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from valuegate.errors import ValuegateError
from valuegate.storage.lance import (
    RetryPolicy,
    Workspace,
    classify_error,
    primary_key,
    sql_in,
    sql_str,
)

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("group", pa.string()),
        pa.field("value", pa.float64()),
    ]
)
FAST_RETRY = RetryPolicy(attempts=8, base_delay_s=0.01, max_delay_s=0.2)


def rows(ids, group="g", value=1.0) -> pa.Table:
    ids = list(ids)
    return pa.table(
        {"id": ids, "group": [group] * len(ids), "value": [float(value)] * len(ids)}, schema=SCHEMA
    )


@pytest.fixture(params=["local", "s3"])
def ws_args(request, tmp_path) -> tuple[str, dict[str, str] | None]:
    """(uri, storage_options) of an empty workspace: a tmp directory, or a fresh bucket on moto."""
    if request.param == "local":
        return str(tmp_path / "ws"), None
    server = request.getfixturevalue("s3_server")
    return server.make_bucket(f"lance-{uuid.uuid4().hex[:12]}") + "/ws", server.storage_options


@pytest.fixture
def ws(ws_args) -> Workspace:
    return Workspace(*ws_args, retry=FAST_RETRY)


# ------------------------------------------------------------------------------------------ tables


def test_append_read_filter_count_delete_upsert(ws):
    assert not ws.table_exists("items")
    v1 = ws.append("items", rows(["a", "b", "c"], group="x"), SCHEMA)
    assert ws.table_exists("items") and "items" in ws.table_names()
    v2 = ws.append("items", rows(["d", "it's"], group="y", value=2.0), SCHEMA)
    assert v2 == v1 + 1 == ws.version("items")
    assert ws.append("items", rows([]), SCHEMA) == v2  # nothing to write: no commit

    assert sorted(ws.read("items")["id"].to_pylist()) == ["a", "b", "c", "d", "it's"]
    quoted = sql_str("it's")
    assert ws.read("items", where=f"id = {quoted}")["value"].to_pylist() == [2.0]
    part = ws.read("items", where="`group` = 'y'", columns=["value", "id"])
    assert part.column_names == ["value", "id"] and sorted(part["id"].to_pylist()) == ["d", "it's"]
    assert ws.count("items") == 5 and ws.count("items", sql_in("id", ["a", "d", "zz"])) == 2
    assert ws.count("items", sql_in("id", [])) == 0

    # columns in another order and castable types are conformed to the schema
    shuffled = pa.table({"value": pa.array([3], pa.int32()), "id": ["e"], "group": ["z"]})
    ws.append("items", shuffled, SCHEMA)
    assert ws.read("items", where="id = 'e'").to_pylist() == [{"id": "e", "group": "z", "value": 3.0}]

    v = ws.delete("items", sql_in("id", ["a", "e"]))
    assert v == ws.version("items") and ws.count("items") == 4

    v = ws.upsert("items", rows(["b", "new"], group="u", value=9.0), on="id")
    assert v == ws.version("items") and ws.count("items") == 5
    got = {r["id"]: (r["group"], r["value"]) for r in ws.read("items").to_pylist()}
    assert got["b"] == ("u", 9.0) and got["new"] == ("u", 9.0) and got["c"] == ("x", 1.0)

    ws.upsert("items", rows(["b", "newer"], group="w", value=0.0), on=["id"], update=False)
    got = {r["id"]: (r["group"], r["value"]) for r in ws.read("items").to_pylist()}
    assert got["b"] == ("u", 9.0) and got["newer"] == ("w", 0.0) and len(got) == 6

    with pytest.raises(ValuegateError, match="duplicate key"):
        ws.upsert("items", rows(["q", "q"]), on="id")
    with pytest.raises(ValuegateError, match="not in the table"):
        ws.upsert("items", rows(["q"]), on="nope")


def test_schema_mismatch_and_bad_input(ws):
    ws.ensure("items", SCHEMA)
    ws.ensure("items", SCHEMA)  # same schema: fine
    other = pa.schema(
        [pa.field("id", pa.string()), pa.field("group", pa.int64()), pa.field("extra", pa.bool_())]
    )
    with pytest.raises(ValuegateError) as err:
        ws.ensure("items", other)
    msg = str(err.value)
    assert "'items'" in msg and "'group'" in msg and "'extra'" in msg and "'value'" in msg
    with pytest.raises(ValuegateError, match="'items'"):
        ws.append("items", rows(["a"]), other)
    with pytest.raises(ValuegateError, match="missing columns"):
        ws.append("items", pa.table({"id": ["a"]}), SCHEMA)
    with pytest.raises(ValuegateError, match="cannot be cast"):
        ws.append("items", pa.table({"id": ["a"], "group": ["g"], "value": ["not a number"]}), SCHEMA)
    with pytest.raises(ValuegateError, match="cannot be cast"):  # id is not nullable
        ws.append("items", pa.table({"id": [None], "group": ["g"], "value": [1.0]}), SCHEMA)
    with pytest.raises(ValuegateError, match="does not exist"):
        ws.read("missing")
    assert not ws.table_exists("missing")
    with pytest.raises(ValuegateError, match="invalid table name"):
        ws.ensure("valsets/name", SCHEMA)


def test_overwrite_keeps_history(ws):
    v1 = ws.overwrite("vs", rows(["a", "b"]), SCHEMA)
    ws.tag("vs", "v1", v1)
    v2 = ws.overwrite("vs", rows(["c"]), SCHEMA)
    assert v2 > v1 and ws.read("vs")["id"].to_pylist() == ["c"]
    assert sorted(ws.read("vs", version="v1")["id"].to_pylist()) == ["a", "b"]


# ------------------------------------------------------------------------------- versions and tags


def test_versions_and_tags(ws):
    v1 = ws.append("t", rows(["a", "b"]), SCHEMA)
    assert ws.tag("t", "first", v1) == v1
    assert ws.tag("t", "first", v1) == v1  # the same again: no-op
    v2 = ws.append("t", rows(["c"]), SCHEMA)
    v3 = ws.append("t", rows(["d"]), SCHEMA)
    assert ws.tag("t", "latest") == v3

    versions = ws.versions("t")
    numbers = [v["version"] for v in versions]
    assert numbers == sorted(numbers) and numbers[-3:] == [v1, v2, v3]
    now = dt.datetime.now(dt.timezone.utc)
    for v in versions:
        assert v["timestamp"].tzinfo is not None and abs(now - v["timestamp"]) < dt.timedelta(minutes=5)

    assert ws.tags("t") == {"first": v1, "latest": v3}
    assert sorted(ws.read("t", version="first")["id"].to_pylist()) == ["a", "b"]
    assert sorted(ws.read("t", version=v2)["id"].to_pylist()) == ["a", "b", "c"]
    assert ws.read("t", version="first", where="id = 'b'", columns=["id"]).to_pylist() == [{"id": "b"}]
    assert ws.count("t") == 4 and ws.version("t") == v3  # reading old versions leaves the table at the latest
    ws.append("t", rows(["e"]), SCHEMA)  # and writable

    with pytest.raises(ValuegateError, match="already points at version"):
        ws.tag("t", "first", v2)
    with pytest.raises(ValuegateError, match="no version or tag"):
        ws.read("t", version="nope")
    with pytest.raises(ValuegateError, match="no version or tag"):
        ws.read("t", version=999)
    ws.delete_tag("t", "first")
    assert ws.tags("t") == {"latest": v3}
    with pytest.raises(ValuegateError, match="no tag"):
        ws.delete_tag("t", "first")
    assert ws.tag("t", "first", v2) == v2  # a deleted tag can be set again, anywhere


# ------------------------------------------------------------------------------ concurrent appends

N_PROCS = 4
N_COMMITS = 5
ROWS_PER_COMMIT = 10


def _batch_ids(mode: str, worker: int, commit: int) -> list[str]:
    if mode == "upsert":  # every worker writes the same, overlapping windows of keys
        return [f"k{i}" for i in range(commit * 4, commit * 4 + 2 * ROWS_PER_COMMIT)]
    return [f"w{worker}-c{commit}-r{r}" for r in range(ROWS_PER_COMMIT)]


def _warm_up(barrier) -> int:
    """Import LanceDB in a pool worker; the barrier makes every worker take exactly one warm-up."""
    import lancedb  # noqa: F401

    barrier.wait()
    return os.getpid()


def _writer(uri, storage_options, worker, mode, barrier) -> tuple[int, list[int], dict[str, int]]:
    """One of the concurrent writers (a pool process): ``N_COMMITS`` small commits, each an append, an
    overwrite of the whole table, or an upsert. Returns (worker, versions returned, retry counts)."""
    ws = Workspace(uri, storage_options, retry=FAST_RETRY)
    ws.version("shared")  # open the connection and the table before the start line
    barrier.wait()
    versions = []
    for c in range(N_COMMITS):
        batch = rows(_batch_ids(mode, worker, c), group=f"w{worker}")
        if mode == "upsert":
            versions.append(ws.upsert("shared", batch, on="id"))
        else:
            write = ws.overwrite if mode == "overwrite" else ws.append
            versions.append(write("shared", batch, SCHEMA))
    return worker, versions, ws.retry_counts


@pytest.fixture(scope="module")
def writers():
    """``N_PROCS`` spawned worker processes with LanceDB imported, and a manager for their barriers."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=N_PROCS, mp_context=ctx) as pool:
        barrier = manager.Barrier(N_PROCS, timeout=120)
        pids = [f.result(timeout=180) for f in [pool.submit(_warm_up, barrier) for _ in range(N_PROCS)]]
        assert len(set(pids)) == N_PROCS
        yield pool, manager


def _run_writers(writers, uri, storage_options, modes: list[str]) -> tuple[list, float]:
    """One writer per entry of ``modes``, each in its own process, all starting at once; their reports."""
    pool, manager = writers
    barrier = manager.Barrier(len(modes), timeout=120)
    t0 = time.perf_counter()
    futures = [pool.submit(_writer, uri, storage_options, w, mode, barrier) for w, mode in enumerate(modes)]
    results = sorted(f.result(timeout=180) for f in futures)
    return results, time.perf_counter() - t0


def _report(uri: str, what: str, results: list, elapsed: float) -> str:
    conflicts = sum(c["conflict"] for _, _, c in results)
    transient = sum(c["transient"] for _, _, c in results)
    where = "s3" if uri.startswith("s3://") else "local"
    return (
        f"[{where}] {what} in {elapsed:.1f}s: retried conflicts={conflicts}, "
        f"retried transient errors={transient}"
    )


def test_concurrent_appends_from_processes(ws_args, writers, request):
    uri, storage_options = ws_args
    Workspace(uri, storage_options).ensure("shared", SCHEMA)
    results, elapsed = _run_writers(writers, uri, storage_options, ["append"] * N_PROCS)

    ws = Workspace(uri, storage_options)
    ids = ws.read("shared", columns=["id"])["id"].to_pylist()
    expected = {i for w in range(N_PROCS) for c in range(N_COMMITS) for i in _batch_ids("append", w, c)}
    assert len(ids) == len(expected) and set(ids) == expected  # every row exactly once
    assert ws.version("shared") == 1 + N_PROCS * N_COMMITS  # one version per commit, none lost
    # The version an append returns holds its rows. Under contention it is not always the commit's own:
    # LanceDB 0.40 may report a later one (a concurrent writer's), so versions can repeat across writers.
    for w, versions, _ in results:
        for c, v in enumerate(versions):
            at_v = set(ws.read("shared", columns=["id"], version=v)["id"].to_pylist())
            assert set(_batch_ids("append", w, c)) <= at_v

    line = _report(uri, f"{N_PROCS} processes x {N_COMMITS} appends", results, elapsed)
    if uri.startswith("s3://"):
        server = request.getfixturevalue("s3_server")
        refused = server.count_status(412, uri[len("s3://") :].split("/")[0])
        line += f", manifest PUTs refused by the server (412, rebased inside Lance)={refused}"
    print(line)


def test_concurrent_upserts_of_the_same_keys(ws_args, writers):
    """Overlapping upserts from several processes leave each key once (the primary key set by the first
    upsert makes LanceDB detect them; without it LanceDB 0.40 inserts a key twice)."""
    uri, storage_options = ws_args
    Workspace(uri, storage_options).ensure("shared", SCHEMA)
    results, elapsed = _run_writers(writers, uri, storage_options, ["upsert"] * N_PROCS)
    ws = Workspace(uri, storage_options)
    ids = ws.read("shared", columns=["id"])["id"].to_pylist()
    expected = {i for c in range(N_COMMITS) for i in _batch_ids("upsert", 0, c)}
    assert sorted(ids) == sorted(expected)
    assert primary_key(ws.schema("shared")) == ["id"]
    print(_report(uri, f"{N_PROCS} processes x {N_COMMITS} overlapping upserts", results, elapsed))


def test_appends_racing_an_overwrite_are_retried(ws_args, writers):
    """An append that loses against an overwrite is an incompatible transaction Lance cannot rebase: the
    workspace retries it from the latest version, so no writer fails."""
    uri, storage_options = ws_args
    Workspace(uri, storage_options).ensure("shared", SCHEMA)
    modes = ["overwrite"] + ["append"] * (N_PROCS - 1)
    results, elapsed = _run_writers(writers, uri, storage_options, modes)
    ids = Workspace(uri, storage_options).read("shared", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert set(_batch_ids("overwrite", 0, N_COMMITS - 1)) <= set(ids)  # the last overwrite is there
    print(_report(uri, f"{N_PROCS - 1} appenders racing 1 overwriter", results, elapsed))


# ------------------------------------------------------------------- helpers (no object store needed)


def test_sql_literals_round_trip(tmp_path):
    ws = Workspace(tmp_path / "ws")
    nasty = ["plain", "it's", "a''b", "back\\slash", "back\\'q", "uni\u00e9\u4e2d", "new\nline", "pct%_", ""]
    ws.append("t", rows(nasty), SCHEMA)
    for s in nasty:
        assert ws.read("t", where=f"id = {sql_str(s)}")["id"].to_pylist() == [s]
    assert ws.count("t", sql_in("id", nasty)) == len(nasty)
    assert ws.count("t", sql_in("group", ["g"])) == len(nasty)  # `group` is an SQL keyword: quoted
    ids = [f"id-{i}" for i in range(3000)] + ["it's"]
    assert ws.count("t", sql_in("id", ids)) == 1
    assert sql_str("it's") == "'it''s'"
    assert sql_in("id", []) == "FALSE"
    assert sql_in("n", [1, 2]) == "`n` IN (1, 2)"
    with pytest.raises(ValuegateError):
        sql_str("nul\x00")


def test_classify_error_and_retry_loop(tmp_path):
    assert classify_error(RuntimeError("lance error: Commit conflict for version 7: ...")) == "conflict"
    assert classify_error(RuntimeError("lance error: Retryable commit conflict for version 3")) == "conflict"
    assert (
        classify_error(
            RuntimeError(
                "lance error: Incompatible transaction: This Append transaction is incompatible "
                "with concurrent transaction Overwrite at version 2."
            )
        )
        == "conflict"
    )
    assert classify_error(RuntimeError("Too many concurrent writers. Please retry")) == "conflict"
    connect = 'IO { source: Generic { store: "S3", source: RetryError(... ConnectionRefused ...) } }'
    assert classify_error(ValueError(connect)) == "transient"
    assert classify_error(RuntimeError("LanceError(IO): ... <Code>NoSuchBucket</Code> ... timeout")) is None
    assert classify_error(ValueError("Table 'x' was not found")) is None
    assert classify_error(ValuegateError("commit conflict")) is None
    assert classify_error(KeyError("timeout")) is None

    policy = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=0.004)
    assert all(0.0005 <= policy.delay_s(1) <= 0.001 for _ in range(20))
    assert all(policy.delay_s(10) <= 0.004 for _ in range(20))

    ws = Workspace(tmp_path / "ws", retry=policy)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("lance error: Commit conflict for version 2")
        return "done"

    assert ws._retrying("flaky", flaky) == "done" and ws.retry_counts == {"conflict": 2, "transient": 0}

    def always() -> None:
        raise RuntimeError("lance error: Commit conflict for version 2")

    with pytest.raises(RuntimeError, match="Commit conflict"):
        ws._retrying("always", always)
    assert ws.retry_counts["conflict"] == 2 + 3  # 4 attempts = 3 retries, then the error propagates


def test_from_env_and_pickle(tmp_path, monkeypatch):
    monkeypatch.setenv("VALUEGATE_WORKSPACE", "s3://bucket/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    ws = Workspace.from_env()  # lazy: nothing is contacted
    assert ws.uri == "s3://bucket/prefix"
    assert ws.storage_options == {
        "aws_endpoint": "http://127.0.0.1:9000",
        "aws_access_key_id": "key",
        "aws_secret_access_key": "secret",
        "aws_region": "eu-west-1",
        "allow_http": "true",
    }
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VALUEGATE_WORKSPACE")
    local = Workspace.from_env()
    assert local.uri == str(tmp_path / "valuegate-workspace") and local.storage_options is None
    assert Path(Workspace("rel/dir").uri).is_absolute()

    local.append("t", rows(["a"]), SCHEMA)
    clone = pickle.loads(pickle.dumps(local))
    assert clone.uri == local.uri and clone.read("t")["id"].to_pylist() == ["a"]
