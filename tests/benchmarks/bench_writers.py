"""Concurrent writers benchmark: rows/s into one features table from 1, 2 and 4 writer processes, on local
disk and on a local S3-compatible server (moto, tests/s3server.py), with the commit conflicts retried.

    python -m tests.benchmarks.bench_writers [--out bench-results] [--commits 16] [--rows 128]

Each writer is a spawned process (tests/feature_writers.py) that commits ``--commits`` batches of ``--rows``
synthetic feature rows with the real ``features__<fp>`` schema and the sizes of a default extraction of
SmolLM2-135M (64 support rows x 64 columns, 576-d pooled hidden, 128-d pooled error: about 19 KB a row),
all writers starting at one barrier; every round writes a fresh table. Modes: ``append`` (what a shard does:
disjoint ids, ``write_features``) and ``insert`` (insert-if-absent of the *same* ids from every writer, the
merge-insert a duplicate-proof writer would pay). rows/s counts distinct rows stored per second of the
slowest writer. Conflicts: retries by the :class:`~valuegate.storage.lance.Workspace` (``retry_counts``);
on S3 also the manifest PUTs the server refused with 412 (Lance rebases those inside its commit).
Everything goes to ``--out/writers.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

from tests.benchmarks.tables import cpu_name, table, write_json

ROW_BYTES = 4 * (64 * 64 + 64 + 576 + 128 + 64)  # rows + token ids + pooled hidden + pooled error + error sum


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--commits", type=int, default=16)
    ap.add_argument("--rows", type=int, default=128)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from feature_writers import Writers
    from s3server import _start, _stop

    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg": os.getloadavg()},
           "commits_per_writer": args.commits, "rows_per_commit": args.rows, "row_bytes": ROW_BYTES, "runs": []}
    with tempfile.TemporaryDirectory(prefix="vg-bench-writers-") as tmp:
        server = _start(Path(tmp) / "moto.log")
        pool = Writers(4)
        try:
            for where in ("local", "s3"):
                for mode in ("append", "insert"):
                    for n in (1, 2, 4):
                        if where == "local":
                            uri, options = str(Path(tmp) / f"ws-{uuid.uuid4().hex[:6]}"), None
                        else:
                            bucket = f"bench-{uuid.uuid4().hex[:8]}"
                            uri, options = server.make_bucket(bucket) + "/ws", server.storage_options
                        refused0 = server.count_status(412) if where == "s3" else 0
                        r = pool.run(uri, options, n, mode, args.commits, args.rows)
                        distinct = args.commits * args.rows * (1 if mode == "insert" else n)
                        r.update(where=where, rows_stored=distinct, rows_per_s=distinct / r["writer_s"],
                                 mb_per_s=distinct * ROW_BYTES / r["writer_s"] / 1e6,
                                 commits_per_s=n * args.commits / r["writer_s"],
                                 server_412=(server.count_status(412) - refused0) if where == "s3" else None)
                        out["runs"].append(r)
                        print(f"{where} {mode} x{n}: {r['rows_per_s']:.0f} rows/s, "
                              f"{r['conflicts_retried']} conflicts retried", file=sys.stderr)
        finally:
            pool.close()
            _stop(server.process)
    rows = [{"store": r["where"], "mode": r["mode"], "writers": r["writers"], "rows": r["rows_stored"],
             "seconds": r["writer_s"], "rows/s": r["rows_per_s"], "MB/s": r["mb_per_s"],
             "commits/s": r["commits_per_s"], "conflicts_retried": r["conflicts_retried"],
             "412s": "" if r["server_412"] is None else r["server_412"]} for r in out["runs"]]
    print(table(rows, ["store", "mode", "writers", "rows", "seconds", "rows/s", "MB/s", "commits/s",
                       "conflicts_retried", "412s"],
                f"\nconcurrent writers into one features table ({args.commits} commits x {args.rows} rows per "
                f"writer, ~{ROW_BYTES / 1024:.0f} KiB a row; {out['machine']['cores']} cores)"))
    out["machine"]["loadavg_end"] = os.getloadavg()
    write_json(args.out, "writers", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
