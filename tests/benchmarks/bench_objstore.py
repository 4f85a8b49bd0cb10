"""Conditional writes on S3 through two maintained clients: botocore and obstore (issue 17: keep one beside Lance).

    python -m tests.benchmarks.bench_objstore [--out bench-results] [--n 200] [--repeat 3]

Against the moto server of tests/s3server.py, each client does ``--n`` times the three requests of the release
protocol (:mod:`valuegate.storage.objstore`): a create-if-absent PUT (``If-None-Match: *``) of a fresh key, a GET
that returns the ETag, and a compare-and-swap PUT (``If-Match: <etag>``); then one lost race of each kind (412),
which must come back as a refusal, not an error. ``root`` is :class:`valuegate.storage.objstore.Root` as the
release store uses it (whichever client it is built on). Seconds are the best of ``--repeat`` rounds, each on
fresh keys; moto's own time per request is in every number alike. Everything goes to ``--out/objstore.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.benchmarks.tables import cpu_name, table, write_json


def _botocore(server, bucket: str) -> dict[str, Callable]:
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import ClientError

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, proxies={}))

    def put(key: str, body: bytes, **cond) -> bool:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, **cond)
        except ClientError as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412:
                return False
            raise
        return True

    def get(key: str) -> tuple[bytes, str]:
        r = client.get_object(Bucket=bucket, Key=key)
        return r["Body"].read(), r["ETag"]

    return {"create": lambda k, b: put(k, b, IfNoneMatch="*"), "get": get,
            "replace": lambda k, b, tag: put(k, b, IfMatch=tag)}


def _obstore(server, bucket: str) -> dict[str, Callable]:
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    from obstore.store import S3Store

    store = S3Store(bucket, endpoint=server.endpoint, access_key_id="testing", secret_access_key="testing",
                    region="us-east-1", virtual_hosted_style_request=False, client_options={"allow_http": True},
                    retry_config={"max_retries": 0})

    def put(key: str, body: bytes, mode) -> bool:
        try:
            obstore.put(store, key, body, mode=mode)
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    def get(key: str) -> tuple[bytes, str]:
        r = obstore.get(store, key)
        return bytes(r.bytes()), r.meta["e_tag"]

    return {"create": lambda k, b: put(k, b, "create"), "get": get,
            "replace": lambda k, b, tag: put(k, b, {"e_tag": tag})}


def _root(server, bucket: str) -> dict[str, Callable]:
    from valuegate.storage.objstore import Root

    root = Root(f"s3://{bucket}", server.storage_options)
    return {"create": root.create, "get": root.read_tagged, "replace": root.replace_if}


def _round(ops: dict[str, Callable], n: int) -> dict[str, float]:
    keys = [f"bench/{uuid.uuid4().hex}" for _ in range(n)]
    out = {}
    t = time.perf_counter()
    for k in keys:
        assert ops["create"](k, b"1")
    out["create_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tags = [ops["get"](k)[1] for k in keys]
    out["get_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for k, tag in zip(keys, tags, strict=True):
        assert ops["replace"](k, b"2", tag)
    out["replace_s"] = time.perf_counter() - t
    # the lost races: a create of an existing key, a replace with a stale ETag
    assert ops["create"](keys[0], b"x") is False and ops["replace"](keys[0], b"x", tags[0]) is False
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from s3server import _start, _stop

    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg": os.getloadavg()},
           "n": args.n, "repeat": args.repeat, "runs": []}
    clients = {"botocore": _botocore, "obstore": _obstore, "root": _root}
    with tempfile.TemporaryDirectory(prefix="vg-bench-objstore-") as tmp:
        server = _start(Path(tmp) / "moto.log")
        try:
            for name, make in clients.items():
                bucket = f"bench-{name}-{uuid.uuid4().hex[:6]}"
                server.make_bucket(bucket)
                ops = make(server, bucket)
                _round(ops, 5)  # warm-up: connections, credential lookup
                rounds = [_round(ops, args.n) for _ in range(args.repeat)]
                best = {k: min(r[k] for r in rounds) for k in rounds[0]}
                out["runs"].append({"client": name, **best, "rounds": rounds})
                print(f"{name}: {best}", file=sys.stderr)
        finally:
            _stop(server.process)
    rows = [{"client": r["client"], "create_s": r["create_s"], "get_s": r["get_s"], "replace_s": r["replace_s"],
             "ms/request": 1000 * (r["create_s"] + r["get_s"] + r["replace_s"]) / (3 * args.n)}
            for r in out["runs"]]
    print(table(rows, ["client", "create_s", "get_s", "replace_s", "ms/request"],
                f"\n{args.n} conditional creates, GETs with ETag and compare-and-swap PUTs on the moto server "
                f"(best of {args.repeat}; {out['machine']['cores']} cores)"))
    out["machine"]["loadavg_end"] = os.getloadavg()
    write_json(args.out, "objstore", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
