"""Concurrent writers into one features table, each in its own spawned process (shared by
tests/storage/test_concurrent_writers.py and tests/benchmarks/bench_writers.py).

A writer commits ``commits`` batches of ``rows`` synthetic feature rows (the real ``features__<fp>`` schema,
sizes like a default extraction) into one table through :mod:`valuegate.storage.features` /
:class:`~valuegate.storage.lance.Workspace`, all writers starting at one barrier:

* ``append``: disjoint ids, :func:`valuegate.storage.features.write_features` (what a shard does);
* ``insert``: every writer inserts the *same* ids if absent (``upsert(update=False)`` on the primary key):
  a retried shard racing a zombie attempt of itself.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa

MODEL_FP = "f" * 64
HIDDEN = 576  # SmolLM2-135M
ERROR_DIM = 128
SUPPORT = 64  # rows of the sparse block per sample
WIDTH = 64  # k_h


def synthetic_rows(ids: list[str], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in ids:
        out.append({"id": i, "token_ids": rng.integers(0, 49152, SUPPORT, dtype=np.int32),
                    # in the stored form (int8 steps and their scales): the `insert` mode upserts them as they are
                    "rows": rng.integers(-127, 128, SUPPORT * WIDTH).astype(np.int8).tobytes(),
                    "rows_scale": rng.uniform(0.01, 0.1, SUPPORT).astype(np.float32), "n_tokens": 40,
                    "mean_loss": 1.5, "dropped_mass": 0.01, "self_influence": 3.0,
                    "mean_hidden": rng.standard_normal(HIDDEN).astype(np.float16),
                    "pooled_error": rng.standard_normal(ERROR_DIM).astype(np.float32),
                    "error_sum": rng.standard_normal(SUPPORT).astype(np.float32),
                    "hard_token_ids": None, "hard_rows": None, "hard_error_sum": None, "hard_n_tokens": None,
                    "hard_mean_loss": None, "batch": 0, "seconds": 0.01})
    return out


def batch_ids(mode: str, worker: int, commit: int, rows: int) -> list[str]:
    if mode == "insert":  # the same ids from every writer
        return [f"s{commit}-{r}" for r in range(rows)]
    return [f"w{worker}-c{commit}-r{r}" for r in range(rows)]


def _warm(barrier) -> int:
    import os

    import lancedb  # noqa: F401

    barrier.wait()
    return os.getpid()


def _writer(uri, options, worker, mode, commits, rows, barrier) -> tuple[int, dict, float]:
    from valuegate.storage import features as fstore
    from valuegate.storage import schemas
    from valuegate.storage.lance import Workspace

    ws = Workspace(uri, options)
    table = schemas.features_table(MODEL_FP)
    ws.version(table)  # open the connection and the table before the start line
    batches = [synthetic_rows(batch_ids(mode, worker, c, rows), seed=worker * 1000 + c) for c in range(commits)]
    barrier.wait()
    t0 = time.perf_counter()
    schema = schemas.features_schema(HIDDEN, ERROR_DIM)
    for batch in batches:
        if mode == "insert":
            ws.upsert(table, pa.Table.from_pylist(batch, schema=schema), on="id", update=False)
        else:
            fstore.write_features(ws, MODEL_FP, batch, HIDDEN, ERROR_DIM)
    return worker, ws.retry_counts, time.perf_counter() - t0


class Writers:
    """A pool of ``n`` spawned processes with LanceDB imported (started once, reused for every round)."""

    def __init__(self, n: int) -> None:
        self.n = n
        ctx = mp.get_context("spawn")
        self._manager = ctx.Manager()
        self._pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx)
        barrier = self._manager.Barrier(n, timeout=180)
        pids = [f.result(timeout=300) for f in [self._pool.submit(_warm, barrier) for _ in range(n)]]
        assert len(set(pids)) == n

    def run(self, uri: str, options: dict | None, writers: int, mode: str, commits: int,
            rows: int) -> dict:
        """One round: ``writers`` processes at once; returns wall seconds, rows written, retry counts."""
        from valuegate.storage import schemas
        from valuegate.storage.lance import Workspace

        Workspace(uri, options).ensure(schemas.features_table(MODEL_FP), schemas.features_schema(HIDDEN, ERROR_DIM))
        barrier = self._manager.Barrier(writers, timeout=180)
        t0 = time.perf_counter()
        futures = [self._pool.submit(_writer, uri, options, w, mode, commits, rows, barrier)
                   for w in range(writers)]
        results = [f.result(timeout=600) for f in futures]
        wall = time.perf_counter() - t0
        return {"writers": writers, "mode": mode, "commits": commits, "rows_per_commit": rows,
                "wall_s": wall, "writer_s": max(r[2] for r in results),
                "conflicts_retried": sum(r[1]["conflict"] for r in results),
                "transient_retried": sum(r[1]["transient"] for r in results)}

    def close(self) -> None:
        self._pool.shutdown()
        self._manager.shutdown()
