"""Ingest benchmark: wall time and peak memory of ``valuegate ingest`` of N small prompt/response rows (JSONL),
first into a fresh workspace, then again (unchanged file: a no-op), then a second file holding the same rows
(every row a duplicate of a stored sample).

    python -m tests.benchmarks.bench_ingest [--rows 100000] [--out bench-results]

Each ingest is its own process (``python -m valuegate.cli ingest``), so its peak resident memory is that
process's own (``ru_maxrss`` of the child, read by the parent after it exits). Results go to
``--out/ingest.json``; the table is printed (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.tables import cpu_name, table, write_json


def _rows(n: int) -> list[str]:
    return [json.dumps({"prompt": f"reverse the words of line {i}: alpha beta gamma {i % 97}",
                        "response": f"{i % 97} gamma beta alpha", "family": "ab"[i % 2]}) for i in range(n)]


# the ingest command in a process that prints its own peak resident memory (KiB on Linux) when done
_CHILD = """
import resource, sys
from valuegate.cli import main
rc = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def _ingest(ws: Path, dataset: str, path: Path) -> dict:
    """One ``valuegate ingest`` process: its wall seconds (start-up and imports included), its peak RSS
    (MiB) and its last line."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, "ingest", dataset, str(path), "--workspace", str(ws),
                        "--quiet"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(int(p.stdout.split()[-1]) / 1024, 1),
            "said": p.stderr.strip().splitlines()[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg": os.getloadavg()},
           "rows": args.rows, "runs": []}
    with tempfile.TemporaryDirectory(prefix="vg-bench-ingest-") as tmp:
        first, second = Path(tmp) / "train.jsonl", Path(tmp) / "copy.jsonl"
        text = "\n".join(_rows(args.rows)) + "\n"
        first.write_text(text)
        second.write_text(text)
        ws = Path(tmp) / "ws"
        for case, path in (("fresh", first), ("unchanged file", first), ("same rows, new file", second)):
            res = _ingest(ws, "d", path)
            res |= {"case": case, "rows_per_s": round(args.rows / res["wall_s"], 1), "mb": round(len(text) / 1e6, 1)}
            out["runs"].append(res)
    print(table(out["runs"], ["case", "mb", "wall_s", "rows_per_s", "peak_rss_mib"],
                f"\ningest of {args.rows} rows ({out['machine']['cpu']}, {out['machine']['cores']} cores; "
                "wall time includes the process start)"))
    write_json(args.out, "ingest", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
