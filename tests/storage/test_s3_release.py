"""Releases on an S3-compatible store (the moto server of tests/s3server.py): the same layout and protocol as on
local disk, CURRENT moved by compare-and-swap (If-Match), versions claimed by create-if-absent
(If-None-Match), and concurrent promoters in separate processes serialised on both kinds of root."""

from __future__ import annotations

import json
import multiprocessing as mp

import polars as pl
import pytest
from test_release import NAME, _fields, _kept, _publish, _scores

from valuegate.errors import StoreUnreachable, ValuegateError
from valuegate.storage import releases as store
from valuegate.storage.lance import Workspace
from valuegate.storage.objstore import Root, open_root, workspace_id
from valuegate.tasks.release import build_manifest, diff_releases, rollback


def _ws(s3_server, bucket: str) -> Workspace:
    return Workspace(s3_server.make_bucket(bucket) + "/ws", s3_server.storage_options)


def test_release_round_trip_on_s3(s3_server, tmp_path, monkeypatch, capsys):
    ws = _ws(s3_server, "vg-release-rt")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "index.html").write_text("<html>docs</html>")
    (docs / "sub" / "page.html").write_text("<html>page</html>")
    first = _publish(ws, {"a": 1.0, "b": -1.0})
    assert first == {"version": "v0001", "current": True, "previous": None}
    scores = _scores({"a": 1.0, "b": 2.0, "c": 3.0})
    v = store.allocate_version(ws, NAME)
    assert v == "v0002" and store.version_exists(ws, NAME, v) and not store.release_exists(ws, NAME, v)
    where = store.write_release(ws, NAME, v, _kept(scores), build_manifest(name=NAME, version=v, **_fields()),
                                {"gate": docs}, scores=scores)
    assert where == "s3://vg-release-rt/ws/releases/demo/v0002" == store.release_uri(ws, NAME, v)
    report = store.write_release_file(ws, NAME, v, "report.html", b"<html>report</html>")
    assert store.promote(ws, NAME, v) == "v0001"

    # the objects a person (or any S3 tool) sees: the local layout, under the workspace prefix
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="vg-release-rt", Prefix="ws/releases/")["Contents"]}
    base = "ws/releases/demo/v0002/"
    assert {base + k for k in ("data.parquet", "scores.parquet", "manifest.json", "report.html",
                               "gate/index.html", "gate/sub/page.html", ".allocated")} <= keys
    assert report == "s3://vg-release-rt/" + base + "report.html"
    current = client.get_object(Bucket="vg-release-rt", Key="ws/releases/demo/CURRENT")["Body"].read()
    assert current.decode().splitlines() == ["v0002", "promotion 2"]

    m = store.read_manifest(ws, NAME, v)
    assert m["files"] == ["gate"] and m["data_rows"] == 3
    assert store.read_release_data(ws, NAME, v, verify=True).equals(_kept(scores))
    assert store.read_release_scores(ws, NAME, v)["kept"].to_list() == [True, True, True]
    assert [(r["version"], r["current"]) for r in store.list_releases(ws, NAME)] == [
        ("v0001", False), ("v0002", True)]
    assert store.list_release_names(ws) == [NAME]
    diff = diff_releases(ws, NAME, "v0001", "v0002")
    assert diff["entered"]["count"] == 2 and diff["left"]["count"] == 0
    with pytest.raises(ValuegateError, match="immutable"):
        store.write_release(ws, NAME, v, _kept(scores), build_manifest(name=NAME, version=v, **_fields()))

    # the CLI on the s3 workspace, its options from the environment as a user would set them
    for key, val in {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, val)
    from valuegate.cli import main as cli

    uri = ws.uri
    capsys.readouterr()
    assert cli(["release", "list", NAME, "--workspace", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("* v0002") and out[0].startswith("  v0001")
    assert cli(["release", "show", NAME, "--workspace", uri]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v0002"
    assert cli(["release", "diff", NAME, "v0001", "v0002", "--workspace", uri]) == 0
    assert "entered: 2" in capsys.readouterr().out
    assert cli(["release", "rollback", NAME, "--workspace", uri]) == 0
    assert "current is now v0001" in capsys.readouterr().out
    assert store.read_current_record(uri, NAME) == {"version": "v0001", "promotion": 3}
    assert rollback(ws, NAME, to="v0002") == "v0002"


def test_crash_before_manifest_on_s3(s3_server, monkeypatch):
    ws = _ws(s3_server, "vg-release-crash")
    _publish(ws, {"a": 1.0})
    v = store.allocate_version(ws, NAME)
    manifest = build_manifest(name=NAME, version=v, **_fields())

    def crash(where, payload):
        raise RuntimeError("power loss")

    monkeypatch.setattr(store, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="power loss"):
        store.write_release(ws, NAME, v, pl.DataFrame({"id": ["a"], "value": [1.0]}), manifest)
    monkeypatch.undo()
    assert not store.release_exists(ws, NAME, v)
    assert [r["version"] for r in store.list_releases(ws, NAME)] == ["v0001"]
    with pytest.raises(ValuegateError, match="no complete release"):
        store.promote(ws, NAME, v)
    assert store.allocate_version(ws, NAME) == "v0003"  # the crashed number is not reused
    store.write_release(ws, NAME, v, pl.DataFrame({"id": ["a"], "value": [1.0]}), manifest)  # completes it
    assert store.promote(ws, NAME, v) == "v0001"


def test_workspace_id_is_created_once(s3_server):
    ws = _ws(s3_server, "vg-wsid")
    first = workspace_id(ws)
    assert len(first) == 32 and workspace_id(ws) == first == workspace_id(Root(ws.uri, ws.storage_options))
    assert workspace_id(_ws(s3_server, "vg-wsid-other")) != first


def test_conditional_writes_on_the_server(s3_server):
    """The primitives themselves: create-if-absent and compare-and-swap answer 412 to the loser."""
    r = open_root(_ws(s3_server, "vg-cas"))
    assert r.create("k", b"1") and not r.create("k", b"2")
    raw, etag = r.read_tagged("k")
    assert raw == b"1" and etag
    assert r.replace_if("k", b"3", etag)
    assert not r.replace_if("k", b"4", etag)  # stale ETag: someone replaced it since
    assert r.read_bytes("k") == b"3"
    assert not r.replace_if("k", b"5", None)  # "only if absent" on an existing key


def test_conditional_write_edge_cases_and_errors(s3_server, caplog):
    """The requests go through obstore (issue 17: no hand-signed requests): a lost race is False, not an error;
    the session token and the endpoint of the storage options reach them; a failure is one line naming the
    object; a transport failure is retried (one log line per retry) before it is reported."""
    from valuegate.storage import retry

    ws = _ws(s3_server, "vg-cas-edges")
    r = open_root(ws)
    assert r.create("k", b"1")
    _, etag = r.read_tagged("k")
    r.delete("k")
    r.delete("k")  # absent: nothing happens
    assert r.read_tagged("k") == (None, None)
    assert not r.replace_if("k", b"2", etag)  # the object it would replace is gone
    assert r.read_bytes("k") is None
    token = Root(ws.uri, {**ws.storage_options, "aws_session_token": "TOKEN"})
    assert token.create("t", b"x") and token.read_bytes("t") == b"x"

    missing = Root("s3://vg-no-such-bucket/ws", s3_server.storage_options)
    with pytest.raises(ValuegateError) as err:
        missing.write_atomic("k", b"1")
    assert str(err.value).startswith("S3 PUT s3://vg-no-such-bucket/ws/k: ") and "\n" not in str(err.value)

    closed = Root("s3://b/ws", {**s3_server.storage_options, "aws_endpoint": "http://127.0.0.1:1"})
    caplog.set_level("INFO", logger="valuegate.storage.retry")
    with pytest.raises(StoreUnreachable) as err:  # a store that does not answer: exit 7, run again later
        closed.create("k", b"1")
    assert str(err.value).startswith("the object store at 127.0.0.1:1 did not answer after every retry (S3 PUT "
                                     "s3://b/ws/k: ") and "\n" not in str(err.value)
    retries = [m for m in caplog.messages if m.startswith("S3 PUT s3://b/ws/k: transient on attempt")]
    assert len(retries) == retry.S3_REQUESTS.attempts - 1


def test_request_addressing_follows_the_storage_options():
    """The obstore requests go where pyarrow's go: path style against an endpoint, the bucket in the host name
    with ``aws_virtual_hosted_style_request`` (also against an endpoint), AWS's regional host without one."""
    keys = {"aws_access_key_id": "AK", "aws_secret_access_key": "SK"}
    path = Root("s3://bkt/ws", {**keys, "aws_endpoint": "http://127.0.0.1:9000", "aws_region": "eu-west-1"})
    assert path._s3.store.config["endpoint"] == "http://127.0.0.1:9000"
    assert path._s3.store.config["region"] == "eu-west-1"
    virtual = Root("s3://bkt/ws", {**keys, "aws_endpoint": "https://minio.example:9000",
                                   "aws_virtual_hosted_style_request": "true"})
    assert virtual._s3.store.config["endpoint"] == "https://bkt.minio.example:9000"
    aws = Root("s3://bkt/ws", {**keys, "aws_region": "eu-west-1"})
    config = aws._s3.store.config
    assert "endpoint" not in config and config["virtual_hosted_style_request"] == "true"


# ------------------------------------------------------------------------------ concurrent promoters

N_PROCS = 4
ROUNDS = 4


def _promoter(root, barrier, queue, worker: int) -> None:
    """Spawned: publish ``ROUNDS`` releases (allocate, write, promote) as fast as possible after the barrier."""
    barrier.wait()
    out = []
    for k in range(ROUNDS):
        values = {f"w{worker}-r{k}": 1.0}
        v = store.allocate_version(root, NAME)
        scores = _scores(values)
        store.write_release(root, NAME, v, _kept(scores), build_manifest(name=NAME, version=v, **_fields()),
                            scores=scores)
        try:
            out.append((v, store.promote(root, NAME, v)))
        except store.NewerIsCurrent as newer:  # a newer release is current: CURRENT never moves back
            out.append((v, f"refused: {newer.current}"))
    queue.put(out)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_promoters_are_serialised(where, tmp_path, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        root = _ws(server, "vg-promoters")
    else:
        root = str(tmp_path)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(N_PROCS), ctx.Queue()
    procs = [ctx.Process(target=_promoter, args=(root, barrier, queue, w)) for w in range(N_PROCS)]
    for p in procs:
        p.start()
    try:
        moves = [m for _ in procs for m in queue.get(timeout=120)]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    n = N_PROCS * ROUNDS
    # every version claimed once
    assert sorted(v for v, _ in moves) == [store.format_version(i) for i in range(1, n + 1)]
    # a refused promotion found a newer version current (issue 15: CURRENT never moves back)
    refused = [(v, p) for v, p in moves if isinstance(p, str) and p.startswith("refused: ")]
    assert all(store.parse_version(p.split()[1]) > store.parse_version(v) for v, p in refused)
    moves = [m for m in moves if m not in refused]
    # every promotion replaced a different state: one linear, increasing history None → ... → CURRENT
    previous = [p for _, p in moves]
    assert len(set(previous)) == len(moves) and previous.count(None) == 1
    final = {v for v, _ in moves} - set(previous)
    rec = store.read_current_record(root, NAME)
    assert final == {rec["version"]} == {store.format_version(n)} and rec["promotion"] == len(moves)
    chain, state = [], None
    following = {p: v for v, p in moves}
    while state in following:
        state = following[state]
        chain.append(state)
    assert len(chain) == len(moves) and chain[-1] == rec["version"] and chain == sorted(chain)
    if where == "s3":
        lost = request.getfixturevalue("s3_server").count_status(412, "vg-promoters/ws/releases/")
        print(f"[s3] {n} promotions from {N_PROCS} processes: {lost} conditional PUTs lost a race and retried")
