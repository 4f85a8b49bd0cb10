"""Runners benchmark: the same extraction on ``local``, ``dask`` (1 and 2 worker processes) and ``ray`` (1 and
2 workers) on this machine, and whether the features are equal across runners.

    python -m tests.benchmarks.bench_runners [--out bench-results] [--rows 96] [--shard-size 24] [--repeats 2]

Each configuration runs as its own child process on a fresh workspace holding the first ``--rows`` training
rows of the embedded demo (``infra/demo/data/train.jsonl``), with the default model (SmolLM2-135M-Instruct,
fetched once by ``valuegate fetch-model``), the default extraction settings, on CPU:

* ``local`` with N cores: :func:`valuegate.tasks.extract.extract_dataset` in the process (one model load),
  torch limited to N threads;
* ``dask``/``ray`` with N workers: the refresh flow's sharded extraction (``_extract_sharded`` inside a
  flow: plan the shards, start a local cluster of N single-threaded worker processes, one task per shard,
  each worker loads the model once, stop the cluster). Dask's nanny and Ray both start their workers with
  ``OMP_NUM_THREADS=1``: a worker process is one core.

Each configuration runs ``--repeats`` times, the rounds interleaved (the machine is shared: its load moves),
and the table keeps each configuration's fastest run (every run is in the JSON).

Timed: the wall seconds of that call, cluster start/stop and model loads included (what a run pays), and
rows/s = rows / wall; ``forward_s`` is the extraction time the shards themselves measured (summed over
workers), ``fixed_s`` = wall − forward_s / workers (cluster start, process imports, model loads, task
dispatch, stop) and ``steady_rows/s`` = rows / (forward_s / workers), the rate once everything is up. The overhead of a runner is its wall time over ``local``'s at the same number of
cores (N workers ↔ ``local`` with N torch threads). The features of every runner are compared with ``local``'s (same ids, each once; the
largest difference of the sparse rows). Everything goes to ``--out/runners.json``.
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

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "infra" / "demo" / "data" / "train.jsonl"
CONFIGS = [("local", 1), ("local", 2), ("dask", 1), ("dask", 2), ("ray", 1), ("ray", 2)]


def _settings(workspace: str, kind: str, workers: int, shard_size: int):
    from valuegate.settings import load_settings

    return load_settings(None, {"workspace": workspace, "data": {"dataset": "bench", "sources": []},
                                "model": {"device": "cpu"},
                                "runner": {"kind": kind, "workers": workers, "shard_size": shard_size}})


def child(kind: str, workers: int, workspace: str, source: str, shard_size: int) -> dict:
    """One configuration in this process: ingest, then the timed extraction."""
    from valuegate.storage.lance import Workspace
    from valuegate.storage.samples import ensure_sample_tables
    from valuegate.tasks.ingest import ingest_file

    settings = _settings(workspace, kind, workers, shard_size)
    ws = Workspace(workspace)
    ensure_sample_tables(ws)
    ingest_file(ws, "bench", source, settings.ingest.max_chars)
    if kind == "local":
        import torch

        from valuegate.tasks.extract import extract_dataset

        torch.set_num_threads(workers)

        t0 = time.perf_counter()
        rep = extract_dataset(ws, "bench", settings, progress=False)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "extracted": rep.extracted, "model_fp": rep.model_fp,
                "forward_s": rep.stats.seconds if rep.stats else None, "workers": 1, "model_loads": 1}
    from prefect import flow

    from valuegate.flows.refresh import _extract_sharded

    @flow(name="bench-sharded-extract")
    def sharded() -> dict:
        return _extract_sharded(settings)

    t0 = time.perf_counter()
    out = sharded()
    wall = time.perf_counter() - t0
    from valuegate.storage import schemas

    [fp] = ws.read(schemas.FEATURE_SETS)["model_fp"].to_pylist()
    return {"wall_s": wall, "extracted": out["extracted"], "model_fp": fp, "shards": out["shards"],
            "workers": out["workers"], "model_loads": out["model_loads"], "forward_s": out["forward_s"]}


def _features(workspace: str, model_fp: str) -> dict:
    from valuegate.storage import features as fstore
    from valuegate.storage.lance import Workspace

    t = fstore.read_features(Workspace(workspace), model_fp, columns=["id", "token_ids", "rows"])
    return {i: (tok, rows) for i, tok, rows in zip(t["id"].to_pylist(), t["token_ids"].to_pylist(),
                                                   t["rows"].to_pylist(), strict=True)}


def compare(ref: dict, got: dict) -> dict:
    import numpy as np

    same_ids = sorted(ref) == sorted(got)
    worst, scale = 0.0, 0.0
    supports_equal = True
    for i in ref.keys() & got.keys():
        supports_equal &= list(ref[i][0]) == list(got[i][0])
        a, b = np.asarray(ref[i][1], np.float64), np.asarray(got[i][1], np.float64)
        if a.shape == b.shape:
            worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
            scale = max(scale, float(np.max(np.abs(a))) if a.size else 0.0)
        else:
            supports_equal = False
    return {"same_ids": same_ids, "rows": len(got), "supports_equal": supports_equal,
            "max_abs_diff": worst, "max_rel_diff": worst / scale if scale else 0.0}


def summary(out: dict) -> str:
    """The table of a runners.json: each configuration's fastest run."""
    best = {}
    for r in out["runs"]:
        key = (r["runner"], r["n_workers"])
        if key not in best or r["wall_s"] < best[key]["wall_s"]:
            best[key] = r
    rows = []
    for (_kind, workers), r in best.items():
        local = best[("local", workers)]["wall_s"]
        eq = r["equal_to_local"]
        # extraction seconds per worker: the shards' sum spread over the workers; local's is wall time already
        busy = r["forward_s"] if r["runner"] == "local" else r["forward_s"] / r["n_workers"]
        rows.append({"runner": r["runner"], "workers": r["n_workers"], "rows": r["extracted"],
                     "wall_s": r["wall_s"], "rows/s": r["extracted"] / r["wall_s"],
                     "vs_local_same_cores": r["wall_s"] / local, "forward_s": r["forward_s"],
                     "fixed_s": r["wall_s"] - busy, "steady_rows/s": r["extracted"] / busy,
                     "model_loads": r["model_loads"],
                     "equal": "yes" if eq["same_ids"] and eq["supports_equal"] and eq["max_rel_diff"] < 1e-4
                     else "NO", "max_rel_diff": eq["max_rel_diff"]})
    return table(rows, ["runner", "workers", "rows", "wall_s", "rows/s", "vs_local_same_cores", "forward_s", "fixed_s",
                       "steady_rows/s", "model_loads", "equal", "max_rel_diff"],
                f"\nextraction of {out['rows']} demo rows, SmolLM2-135M on CPU ({out['machine']['cores']} cores, "
                f"{out['machine']['cpu']}; best of {out['repeats']}); wall includes cluster start/stop and model loads; "
                f"workers = worker processes (cluster) or torch threads (local)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--table", metavar="JSON", help="only print the table of an earlier runners.json")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "WORKERS", "WORKSPACE", "SOURCE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        print(summary(json.loads(Path(args.table).read_text())))
        return 0
    if args.child:
        kind, workers, workspace, source = args.child
        res = child(kind, int(workers), workspace, source, args.shard_size)
        print("RESULT " + json.dumps(res))
        return 0

    from valuegate.default_model import default_model_cached

    if not default_model_cached():
        subprocess.run([sys.executable, "-m", "valuegate.cli", "fetch-model"], check=True, cwd=REPO)
    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": sys.version.split()[0],
                       "loadavg": os.getloadavg()},
           "model": "smollm2-135m-instruct (embedded default), CPU", "rows": args.rows,
           "shard_size": args.shard_size, "repeats": args.repeats, "runs": []}
    with tempfile.TemporaryDirectory(prefix="vg-bench-runners-") as tmp:
        source = Path(tmp) / "train.jsonl"
        source.write_text("".join(DEMO.read_text().splitlines(keepends=True)[: args.rows]))
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect-home"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("PREFECT_API_URL", None)
        ref = None
        for rnd in range(args.repeats):
            for kind, workers in CONFIGS:
                ws = str(Path(tmp) / f"ws-{kind}-{workers}-{rnd}")
                print(f"round {rnd + 1}: {kind} x{workers} ...", file=sys.stderr)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_runners", "--shard-size",
                                       str(args.shard_size), "--child", kind, str(workers), ws, str(source)],
                                      env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(f"{kind} x{workers} failed:\n{proc.stderr[-4000:]}")
                res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
                res.update(runner=kind, n_workers=workers, round=rnd, process_s=time.perf_counter() - t0,
                           loadavg=os.getloadavg()[0])
                feats = _features(ws, res["model_fp"])
                if ref is None:
                    ref = feats
                res["equal_to_local"] = compare(ref, feats)
                out["runs"].append(res)
    print(summary(out))
    out["machine"]["loadavg_end"] = os.getloadavg()
    write_json(args.out, "runners", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
