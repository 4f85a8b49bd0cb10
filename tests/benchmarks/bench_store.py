"""Feature-store benchmarks: incremental extraction, re-scoring a new validation version, and scale.

    python -m tests.benchmarks.bench_store [--data DIR] [--out bench-results] [--quick]
        [--only incremental|rescore|scale|storage|layout|scoring] [--scoring-sizes 10000,100000] [--scale-sizes 10000,100000]
        [--storage-sizes 10000,100000] [--key-read-sizes 100000,1000000] [--real-cache FILE.parquet]

Sections (each prints a table; everything goes to ``--out/store.json``):

- incremental: the embedded default model (``default_settings()``), a workspace in a temp directory.
  Ingest 1,000 DataInf training samples and extract them (what ``valuegate extract`` does), then ingest
  100 new samples (a second file) and extract again (model time must scale with the 100), then extract
  once more with nothing new (must extract 0 and never load the model).
- rescore: on that workspace register a validation set v1 (100 test rows) and ``score_dataset`` it (mean),
  register v2 (100 other rows) and score again: the validation extraction and the scoring-only time
  (read + score + write) as fractions of the 1,000-sample training extraction; one ``nearest`` run.
- scale: synthetic features shaped like the default model's real ones (support sizes, token counts and
  vocabulary overlap taken from real extracted features) written into a fresh ``features__<fp>`` table
  for each N: write rate, disk size, peak RSS, mean-aggregate scoring against a 1,000-row synthetic
  validation set, and nearest-aggregate on a 10k subset (extrapolated to N). (The dense-vector search
  on ``mean_hidden`` it once measured went with the vector index, which nothing in valuegate read: issue 30.)
  Sizes whose projected disk use exceeds ``--max-disk-gb`` are skipped; 1M is always extrapolated.

- storage (only with ``--only storage``; issue 19): per N of ``--storage-sizes``, synthetic rows as in
  scale (error and hard-token columns included): reading every id in 8,000-id calls four ways (``id IN``
  per 2,000 ids as before, a scan with ``is_in``, a BTREE index on ``id``, and ``read_features`` now), the
  ``mean`` aggregate by one streaming scan against the disk's sequential read rate (``dd``, direct and
  buffered), peak RSS per step
  and growth exponents per step; and thin rows (id + 1 KB) read by id up to ``--key-read-sizes``.
  About 17 min for 10k,100k plus 8 min for the thin rows up to 1M on the loaded 2 cores.
- scoring (only with ``--only scoring``; issue 19): per N of ``--scoring-sizes``, synthetic rows with their
  ``sketch`` column against 1,000 validation rows, signals off: the ``mean`` by one streaming scan
  (``score_streaming``) and by reads by id, MB/s against ``dd``; ``nearest`` by sketch candidates, the
  exhaustive oracle on a sample (recall of its top k, time extrapolated); growth exponents; the recall
  on real rows apart (the synthetic rows have no neighbourhood structure).
- layout (only with ``--only layout``): bytes per sample on disk of the real rows written as feature
  format 4 (float32 rows) and as format 5 stores them (``stored_features``: float16 rows, with and
  without the ``sketch`` column), Spearman (against the float32 rows) of candidate feature-row layouts,
  and the recall of the exact nearest top 5 among candidates by dense similarities (pooled vectors, count
  sketches of the rows in float32 and as stored in float16). About a minute.

Real features come from the incremental workspace, else an extraction of 200 DataInf samples (a few
minutes), cached in ``--real-cache`` when given. ``--only rescore`` runs the incremental section too (it
builds the workspace rescore needs).
"""

from __future__ import annotations

import _thread
import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tests.benchmarks.bench_engine import DEFAULT_DATA, machine, peak_rss_mb
from valuegate.engine.sketch import count_sketch
from valuegate.settings import Settings, default_settings
from valuegate.storage import features as fstore
from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace

ROW_KEYS = ("token_ids", "rows", "n_tokens", "mean_hidden", "pooled_error", "mean_loss", "dropped_mass")
SCORE_COLS = ["id", "token_ids", "rows", "n_tokens", "mean_loss", "self_influence"]
HARD_RSS_MB = 11 * 1024  # the watchdog interrupts the run above this (the machine is shared)


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident memory of this process, MiB."""
    return _status_mb("VmRSS")


def hwm_mb() -> float:
    """Peak resident memory since the last :func:`reset_hwm` (or process start), MiB."""
    return _status_mb("VmHWM")


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (``clear_refs`` 5); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemWatch:
    """Peak RSS during a block, sampled every ``interval`` seconds: ``base_mb``, ``peak_mb``, ``delta_mb``."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval

    def __enter__(self) -> MemWatch:
        self.base_mb = self.peak_mb = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.base_mb


def start_watchdog(limit_mb: float = HARD_RSS_MB) -> None:
    """Interrupt the main thread when RSS passes ``limit_mb``; exit hard at 105% of it."""

    def run() -> None:
        warned = False
        while True:
            time.sleep(0.05)
            r = rss_mb()
            if r > 1.05 * limit_mb:
                print(f"bench_store: RSS {r:.0f} MiB above {1.05 * limit_mb:.0f}: exiting", file=sys.stderr)
                os._exit(3)
            if r > limit_mb and not warned:
                warned = True
                print(f"bench_store: RSS {r:.0f} MiB above {limit_mb:.0f}: interrupting", file=sys.stderr)
                _thread.interrupt_main()

    threading.Thread(target=run, daemon=True).start()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (rss {rss_mb():.0f} MiB, load {os.getloadavg()[0]:.1f})",
          flush=True)


def du_bytes(path: str | Path) -> int:
    """``du -sb`` of a directory."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def _distinct_rows(path: Path) -> list[tuple[str, dict]]:
    """(sample id, raw JSON row) of a JSONL file, first occurrence of each content only."""
    from valuegate.inputs.identity import sample_id, sample_record
    from valuegate.inputs.rows import read_samples

    _, samples = read_samples(path)
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out, seen = [], set()
    for s, r in zip(samples, raw, strict=True):
        sid = sample_id(sample_record(s))
        if sid not in seen:
            seen.add(sid)
            out.append((sid, r))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def make_inputs(data: Path, work: Path, n_first: int, n_new: int, n_valid: int) -> dict:
    """Two training files (``n_first`` then ``n_new`` distinct new contents, half from each DataInf task)
    and two validation files (``n_valid`` rows each, disjoint selections of the two test sets)."""
    train = {t: _distinct_rows(data / f"{t}_train.jsonl") for t in ("grammars", "math_without_reason")}
    test = {t: _distinct_rows(data / f"{t}_test.jsonl") for t in ("grammars", "math_without_reason")}
    h1, h2, hv = n_first // 2, n_new // 2, n_valid // 2
    first = [r for t in train for _, r in train[t][:h1]]
    new = [r for t in train for _, r in train[t][h1:h1 + h2]]
    ids_first = {i for t in train for i, _ in train[t][:h1]}
    assert not ids_first & {i for t in train for i, _ in train[t][h1:h1 + h2]}
    v1 = [r for t in test for _, r in test[t][:hv]]
    v2 = [r for t in test for _, r in test[t][hv:2 * hv]]
    return {"first": _write_jsonl(work / "inputs" / "train_first.jsonl", first),
            "new": _write_jsonl(work / "inputs" / "train_new.jsonl", new),
            "v1": _write_jsonl(work / "inputs" / "valid_v1.jsonl", v1),
            "v2": _write_jsonl(work / "inputs" / "valid_v2.jsonl", v2),
            "counts": {"first": len(first), "new": len(new), "v1": len(v1), "v2": len(v2)}}


# --------------------------------------------------------------------------------------------------
# 1. incremental extraction
# --------------------------------------------------------------------------------------------------


class TimedModelLoads:
    """Time every ``load_model`` call made while the block runs (the task modules look it up at call
    time from ``valuegate.engine.model``, or hold it as ``valuegate.tasks.score.load_model``)."""

    def __enter__(self) -> list[float]:
        import valuegate.engine.model as model_mod
        import valuegate.tasks.extract as score_mod

        self.mods = (model_mod, score_mod)
        self.orig = model_mod.load_model
        self.loads: list[float] = []
        orig = self.orig

        def timed(*a, **k):
            t = time.perf_counter()
            lm = orig(*a, **k)
            self.loads.append(time.perf_counter() - t)
            return lm

        for m in self.mods:
            m.load_model = timed
        return self.loads

    def __exit__(self, *exc) -> None:
        for m in self.mods:
            m.load_model = self.orig


def run_extract(ws: Workspace, settings: Settings, dataset: str) -> tuple[dict, str]:
    """What ``valuegate extract DATASET`` does (``extract_dataset``, behind valuegate/cli.py ``_cmd_extract``),
    timed; each call loads the model afresh, as a separate CLI invocation would."""
    from valuegate.tasks.extract import extract_dataset

    with TimedModelLoads() as loads:
        t0 = time.perf_counter()
        rep = extract_dataset(ws, dataset, settings, progress=False)
        wall = time.perf_counter() - t0
    s = rep.stats
    return {"in_dataset": rep.requested, "missing": rep.requested - rep.already, "extracted": rep.extracted,
            "refused": len(rep.refused or []), "batches": rep.batches, "model_loaded": bool(loads),
            "model_load_s": sum(loads), "model_s": s.seconds, "model_samples": s.samples,
            "counted_tokens": s.counted_tokens, "model_tokens": s.model_tokens,
            "model_s_per_sample": s.seconds / s.samples if s.samples else 0.0,
            "wall_s": wall, "store_s": wall - s.seconds - sum(loads)}, rep.model_fp


def bench_incremental(ws: Workspace, settings: Settings, inputs: dict) -> dict:
    from valuegate.tasks.ingest import ingest_file

    mc = settings.ingest.max_chars
    sstore.ensure_sample_tables(ws)
    runs = []
    t0 = time.perf_counter()
    r1 = ingest_file(ws, "train", inputs["first"], mc)
    ingest1 = time.perf_counter() - t0
    log(f"ingested {r1.line()} in {ingest1:.2f}s")
    e1, fp = run_extract(ws, settings, "train")
    runs.append({"run": f"initial {r1.new_samples}", "ingest_s": ingest1, "new_samples": r1.new_samples, **e1})
    log(f"extract 1: {json.dumps(e1)}")
    t0 = time.perf_counter()
    r2 = ingest_file(ws, "train", inputs["new"], mc)
    ingest2 = time.perf_counter() - t0
    log(f"ingested {r2.line()} in {ingest2:.2f}s")
    e2, _ = run_extract(ws, settings, "train")
    runs.append({"run": f"+{r2.new_samples} new", "ingest_s": ingest2, "new_samples": r2.new_samples, **e2})
    log(f"extract 2: {json.dumps(e2)}")
    e3, _ = run_extract(ws, settings, "train")
    runs.append({"run": "nothing new", "ingest_s": 0.0, "new_samples": 0, **e3})
    log(f"extract 3: {json.dumps(e3)}")
    ratio = {
        "samples_ratio": e2["extracted"] / max(1, e1["extracted"]),
        "model_s_ratio": e2["model_s"] / e1["model_s"] if e1["model_s"] else float("nan"),
        "wall_s_ratio": e2["wall_s"] / e1["wall_s"],
        "wall_minus_load_ratio": (e2["wall_s"] - e2["model_load_s"]) / (e1["wall_s"] - e1["model_load_s"]),
        "tokens_ratio": e2["model_tokens"] / max(1, e1["model_tokens"]),
        "noop_extracted": e3["extracted"], "noop_model_loaded": e3["model_loaded"], "noop_wall_s": e3["wall_s"],
    }
    return {"runs": runs, "ratio": ratio, "model_fp": fp}


# --------------------------------------------------------------------------------------------------
# 2. re-scoring against a new validation version
# --------------------------------------------------------------------------------------------------


def _score_run(ws: Workspace, settings: Settings, ref: str, label: str) -> dict:
    from valuegate.tasks.score import score_dataset

    with TimedModelLoads() as loads:
        t0 = time.perf_counter()
        rep = score_dataset(ws, "train", ref, settings, progress=False)
        wall = time.perf_counter() - t0
    tm = rep.timings
    rv, rt = rep.extract_valid, rep.extract_train
    vs = rv.stats.seconds if rv and rv.stats else 0.0
    row = {"run": label, "valset": rep.valset, "aggregate": settings.score.aggregate, "n_train": rep.n_train,
           "n_valid": rep.n_valid, "train_extracted": rt.extracted, "valid_extracted": rv.extracted,
           "model_load_s": sum(loads), "valid_model_s": vs, **{f"{k}_s": v for k, v in tm.items()},
           "wall_s": wall}
    row["scoring_only_s"] = tm.get("read", 0) + tm.get("score", 0) + tm.get("write", 0)
    row["extract_other_s"] = tm.get("extract", 0) - sum(loads) - vs
    row["fixed_s"] = wall - tm.get("extract", 0)  # resolve + read + score + write (+ bookkeeping)
    vals = rep.table.column("value").to_numpy()
    row["values_finite"] = bool(np.isfinite(vals).all())
    return row


def bench_rescore(ws: Workspace, settings: Settings, inputs: dict, train_extract: dict) -> dict:
    from valuegate.tasks.validation_set import register_valset

    mc = settings.ingest.max_chars
    runs = []
    regs = {}
    for v in ("v1", "v2"):
        t0 = time.perf_counter()
        rec, new = register_valset(ws, "val", inputs[v], mc)
        regs[v] = {"register_s": time.perf_counter() - t0, "version": rec["version"], "rows": rec["rows"],
                   "new": new}
        log(f"registered val@v{rec['version']} ({rec['rows']} rows) in {regs[v]['register_s']:.2f}s")
        runs.append(_score_run(ws, settings, f"val@v{rec['version']}", f"{v} mean"))
        log(f"score: {json.dumps(runs[-1])}")
    near = settings.model_copy(update={"score": settings.score.model_copy(update={"aggregate": "nearest"})})
    runs.append(_score_run(ws, near, "val@v2", "v2 nearest"))
    log(f"score: {json.dumps(runs[-1])}")
    base_wall, base_model = train_extract["wall_s"], train_extract["model_s"]
    v2 = runs[1]
    summary = {
        "train_extract_wall_s": base_wall, "train_extract_model_s": base_model,
        "train_extract_samples": train_extract["extracted"],
        "v2_valid_extract_s": v2["extract_s"], "v2_valid_model_load_s": v2["model_load_s"],
        "v2_valid_model_s": v2["valid_model_s"], "v2_valid_extract_other_s": v2["extract_other_s"],
        "v2_scoring_only_s": v2["scoring_only_s"], "v2_fixed_s": v2["fixed_s"], "v2_total_s": v2["wall_s"],
        "frac_scoring_only": v2["scoring_only_s"] / base_wall,
        "frac_fixed": v2["fixed_s"] / base_wall,
        "frac_valid_extract": v2["extract_s"] / base_wall,
        "frac_total": v2["wall_s"] / base_wall,
        "valid_model_s_per_sample": v2["valid_model_s"] / max(1, v2["valid_extracted"]),
        "train_model_s_per_sample": base_model / max(1, train_extract["extracted"]),
        "nearest_total_s": runs[2]["wall_s"], "nearest_score_s": runs[2]["score_s"],
    }
    return {"registrations": regs, "runs": runs, "summary": summary}


# --------------------------------------------------------------------------------------------------
# 3. scale, on synthetic features shaped like real ones
# --------------------------------------------------------------------------------------------------


def real_features_from_store(ws: Workspace, fp: str) -> pa.Table:
    return fstore.read_features(ws, fp, columns=["id", *ROW_KEYS])


def float32_rows_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the sparse rows and the mean hidden state in float32 (feature format 4's precision;
    the in-memory rows of the engine)."""
    def f32(f: pa.Field) -> pa.Field:
        if f.name in ("rows", "hard_rows"):
            return pa.field(f.name, pa.list_(pa.float32()), f.nullable)
        if f.name == "mean_hidden":
            return pa.field(f.name, pa.list_(pa.float32(), f.type.list_size), f.nullable)
        return f
    return pa.schema([f32(f) for f in schema if f.name not in ("sketch", "rows_scale", "hard_rows_scale")])


def with_mean_hidden(real: pa.Table) -> pa.Table:
    """A cached real-feature table of an older bench (``pooled_hidden``, float32 ``Σ_t h_t``) with the
    ``mean_hidden`` column of feature format 7 in its place (float32)."""
    if "mean_hidden" in real.column_names or "pooled_hidden" not in real.column_names:
        return real
    d = real.schema.field("pooled_hidden").type.list_size
    ph = real.column("pooled_hidden").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(real.num_rows, d)
    mean = (ph / np.maximum(real.column("n_tokens").to_numpy(), 1)[:, None]).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(mean.reshape(-1)), d)
    i = real.column_names.index("pooled_hidden")
    return real.set_column(i, pa.field("mean_hidden", pa.list_(pa.float32(), d)), col)


def real_features_by_extraction(settings: Settings, data: Path, n: int) -> pa.Table:
    """Extract ``n`` DataInf training samples (half per task) with the default settings: their float32 rows
    (the engine's, before the store rounds them), in a table of :func:`float32_rows_schema`."""
    from valuegate.engine.extraction import extract_sparse
    from valuegate.engine.model import encode_samples, load_model
    from valuegate.inputs.rows import read_samples
    from valuegate.tasks.extract import feature_row

    lm = load_model(settings.model, progress=False)
    ex = settings.extract
    samples = []
    for t in ("grammars", "math_without_reason"):
        samples += read_samples(data / f"{t}_train.jsonl")[1][: n // 2]
    enc = encode_samples(lm.tokenizer, samples, ex.loss_on, ex.max_length)
    feats = extract_sparse(lm, enc, ex, samples, progress=False)
    rows = [feature_row(f"real-{i}", f, 0, 0.0) for i, f in enumerate(feats)]
    return pa.Table.from_pylist(rows, schema=float32_rows_schema(schemas.features_schema(lm.hidden_size,
                                                                                          ex.error_dim)))


def _supports(t: pa.Table) -> list[np.ndarray]:
    tok = t.column("token_ids").combine_chunks()
    flat = tok.values.to_numpy(zero_copy_only=False)
    off = tok.offsets.to_numpy()
    return [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def pairwise_overlap(supports: list[np.ndarray], rng: np.random.Generator, pairs: int = 20000) -> dict:
    """Mean |U_i ∩ U_j| and mean Jaccard over random pairs i ≠ j."""
    n = len(supports)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n
    inter = np.array([np.intersect1d(supports[a], supports[b], assume_unique=True).size for a, b in zip(i, j, strict=True)])
    union = np.array([supports[a].size + supports[b].size for a, b in zip(i, j, strict=True)]) - inter
    return {"mean_intersection": float(inter.mean()), "mean_jaccard": float((inter / union).mean()),
            "frac_pairs_overlapping": float((inter > 0).mean())}


class SyntheticFeatures:
    """Feature rows shaped like real ones.

    Support sizes, n_tokens, mean_loss and dropped_mass are drawn jointly from the real rows; token ids
    are ``|U|`` distinct draws from a Zipf–Mandelbrot law ``p(rank) ∝ (rank + 2.7)^-a`` over the
    vocabulary (ranks mapped to ids by a fixed random permutation); sparse rows and pooled_error are
    Gaussian with the real element std; mean_hidden is Gaussian with the real mean and covariance.
    """

    def __init__(self, real: pa.Table, vocab: int, width: int, hidden: int, error_dim: int, seed: int = 0):
        self.vocab, self.width, self.hidden, self.error_dim = vocab, width, hidden, error_dim
        self.rng = np.random.default_rng(seed)
        sup = _supports(real)
        self.sizes = np.array([s.size for s in sup])
        self.n_tokens = real.column("n_tokens").to_numpy()
        self.mean_loss = real.column("mean_loss").to_numpy(zero_copy_only=False)
        self.dropped = real.column("dropped_mass").to_numpy(zero_copy_only=False)
        # the hard-token rows (hard_fraction < 1): their support size and counts, per real row (0: none)
        hard = real.column("hard_token_ids") if "hard_token_ids" in real.column_names else None
        self.hard_sizes = (np.array([0 if h is None else len(h) for h in hard.to_pylist()]) if hard is not None
                           else np.zeros(real.num_rows, dtype=int))
        self.hard_n_tokens = (real.column("hard_n_tokens").fill_null(0).to_numpy(zero_copy_only=False)
                              if "hard_n_tokens" in real.column_names else np.zeros(real.num_rows, dtype=int))
        rows = real.column("rows").combine_chunks().values.to_numpy(zero_copy_only=False)
        self.row_std = float(rows.std())
        ph = real.column("mean_hidden").combine_chunks().values.to_numpy(zero_copy_only=False)
        ph = ph.reshape(real.num_rows, -1).astype(np.float64)
        self.ph_mean = ph.mean(0)
        cov = np.cov(ph, rowvar=False) + np.eye(ph.shape[1]) * 1e-6 * np.trace(np.cov(ph, rowvar=False))
        self.ph_chol = np.linalg.cholesky(cov)
        pe = real.column("pooled_error").combine_chunks().values.to_numpy(zero_copy_only=False)
        self.pe_std = float(pe.std()) or 1.0
        self.perm = self.rng.permutation(vocab)
        self.set_exponent(1.0)

    def set_exponent(self, a: float) -> None:
        self.a = a
        w = (np.arange(self.vocab) + 2.7) ** -a
        self.cdf = np.cumsum(w) / w.sum()

    def support(self, size: int) -> np.ndarray:
        """``size`` distinct token ids (successive sampling without replacement), sorted, int32."""
        m = max(8, 2 * size)
        drawn = np.zeros(0, dtype=np.int64)
        while True:
            drawn = np.concatenate([drawn, np.searchsorted(self.cdf, self.rng.random(m))])
            _, first = np.unique(drawn, return_index=True)
            if first.size >= size:
                ranks = drawn[np.sort(first)[:size]]
                return np.sort(self.perm[np.minimum(ranks, self.vocab - 1)]).astype(np.int32)
            m *= 2

    def supports(self, n: int) -> list[np.ndarray]:
        pick = self.rng.integers(0, self.sizes.size, n)
        return [self.support(int(self.sizes[p])) for p in pick]

    def calibrate(self, target_intersection: float, grid: np.ndarray, n: int = 1500) -> list[dict]:
        """Pick the Zipf exponent whose mean pairwise intersection is closest to the real one."""
        tried = []
        for a in grid:
            self.set_exponent(float(a))
            ov = pairwise_overlap(self.supports(n), np.random.default_rng(1), 5000)
            tried.append({"a": float(a), **ov})
        best = min(tried, key=lambda r: abs(r["mean_intersection"] - target_intersection))
        self.set_exponent(best["a"])
        return tried

    def mean_hidden(self, n: int) -> np.ndarray:
        z = self.rng.standard_normal((n, self.hidden))
        return (self.ph_mean + z @ self.ph_chol.T).astype(np.float32)

    def rows(self, n: int, prefix: str, start: int) -> list[dict]:
        """``n`` feature rows (dicts for :func:`storage.features.write_features`)."""
        pick = self.rng.integers(0, self.sizes.size, n)
        sup = [self.support(int(self.sizes[p])) for p in pick]
        lens = np.array([s.size for s in sup]) * self.width
        data = self.rng.standard_normal(int(lens.sum()), dtype=np.float32) * np.float32(self.row_std)
        off = np.concatenate([[0], np.cumsum(lens)])
        self_inf = np.add.reduceat(data.astype(np.float64) ** 2, off[:-1])
        ph = self.mean_hidden(n)
        pe = (self.rng.standard_normal((n, max(self.error_dim, 1)), dtype=np.float32) * np.float32(self.pe_std))
        out = []
        for k in range(n):
            p = pick[k]
            h = min(int(self.hard_sizes[p]), sup[k].size)
            hard = {}
            if h:
                hard = {"hard_token_ids": sup[k][:h], "hard_n_tokens": int(self.hard_n_tokens[p]),
                        "hard_rows": data[off[k]:off[k] + h * self.width],
                        "hard_error_sum": self.rng.standard_normal(h, dtype=np.float32),
                        "hard_mean_loss": float(self.mean_loss[p])}
            out.append({
                "error_sum": self.rng.standard_normal(sup[k].size, dtype=np.float32), **hard,
                "id": hashlib.sha256(f"{prefix}-{start + k}".encode()).hexdigest(),
                "token_ids": sup[k], "rows": data[off[k]:off[k + 1]], "n_tokens": int(self.n_tokens[p]),
                "mean_loss": float(self.mean_loss[p]), "dropped_mass": float(self.dropped[p]),
                "self_influence": float(self_inf[k]), "mean_hidden": ph[k], "pooled_error": pe[k],
                "batch": start // max(1, n), "seconds": 0.0})
        return out


def _fp(tag: str) -> str:
    return hashlib.sha256(json.dumps({"synthetic": tag, "bench": "store"}).encode()).hexdigest()


def write_synthetic(ws: Workspace, gen: SyntheticFeatures, fp: str, n: int, batch: int, prefix: str) -> dict:
    fstore.ensure_feature_set(ws, fp, {"synthetic": prefix, "n": n}, gen.hidden, gen.vocab, gen.width,
                              gen.error_dim)
    ids: list[str] = []
    gen_s = write_s = 0.0
    nnz = 0
    with MemWatch() as mw:
        for lo in range(0, n, batch):
            t0 = time.perf_counter()
            rows = gen.rows(min(batch, n - lo), prefix, lo)
            gen_s += time.perf_counter() - t0
            ids += [r["id"] for r in rows]
            nnz += sum(r["rows"].size for r in rows)
            t0 = time.perf_counter()
            fstore.write_features(ws, fp, rows, gen.hidden, gen.error_dim)
            write_s += time.perf_counter() - t0
            del rows
    return {"ids": ids, "gen_s": gen_s, "write_s": write_s, "rows_per_s": n / write_s, "nnz": nnz,
            "write_peak_rss_mb": mw.peak_mb, "write_rss_delta_mb": mw.delta_mb}


def _matrix(ws: Workspace, fp: str, ids: list[str], vocab: int, width: int):
    from valuegate.tasks.score import _feature_matrix

    t0 = time.perf_counter()
    t = fstore.read_features(ws, fp, ids, SCORE_COLS)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    m, tt = _feature_matrix(t, ids, vocab, width)
    return m, tt, t_read, time.perf_counter() - t0


def mean_scoring(ws: Workspace, fp: str, ids: list[str], vm, vt, vocab: int, width: int,
                 chunk: int | None) -> dict:
    """What score_dataset does for ``mean`` (read the train features by id, one CSR, mean_aggregate),
    in one piece (chunk None) or in id chunks of ``chunk`` (when one piece would not fit in memory)."""
    from valuegate.engine.aggregate import mean_aggregate

    v_self = vt["self_influence"].to_numpy()
    v_tok = vt["n_tokens"].to_numpy().astype(np.int64)
    t_read = t_matrix = t_agg = 0.0
    out = np.zeros(len(ids))
    check = None
    step = chunk or len(ids)
    with MemWatch() as mw:
        for lo in range(0, len(ids), step):
            part = ids[lo:lo + step]
            tm, tt, r, mtx = _matrix(ws, fp, part, vocab, width)
            t_read += r
            t_matrix += mtx
            t0 = time.perf_counter()
            out[lo:lo + len(part)] = mean_aggregate(tm, vm, tt["self_influence"].to_numpy(), v_self,
                                                    tt["n_tokens"].to_numpy().astype(np.int64), v_tok, "none")
            t_agg += time.perf_counter() - t0
            if check is None:  # the pairwise mean on a few rows, as a sanity check
                k = min(200, len(part))
                ref = np.asarray((tm[:k].astype(np.float64) @ vm.astype(np.float64).T).mean(1)).ravel()
                check = float(np.max(np.abs(out[lo:lo + k] - ref)) / max(1e-30, np.max(np.abs(ref))))
            del tm, tt
    return {"mode": "one piece" if chunk is None else f"chunks of {chunk}", "read_s": t_read,
            "matrix_s": t_matrix, "aggregate_s": t_agg, "total_s": t_read + t_matrix + t_agg,
            "peak_rss_mb": mw.peak_mb, "rss_delta_mb": mw.delta_mb, "check_max_rel_err": check,
            "finite": bool(np.isfinite(out).all())}


def nearest_scoring(ws: Workspace, fp: str, ids: list[str], vm, vocab: int, width: int, k: int = 5) -> dict:
    from valuegate.engine.aggregate import aggregate
    from valuegate.engine.forvalue import sparse_cross_csr

    tm, _, t_read, t_mtx = _matrix(ws, fp, ids, vocab, width)
    with MemWatch() as mw:
        t0 = time.perf_counter()
        values = sparse_cross_csr(tm, vm)
        t_cross = time.perf_counter() - t0
        t0 = time.perf_counter()
        agg, top = aggregate(values, "nearest", k)
        t_top = time.perf_counter() - t0
    return {"rows": len(ids), "read_s": t_read, "matrix_s": t_mtx, "cross_s": t_cross, "topk_s": t_top,
            "compute_s": t_cross + t_top, "rss_delta_mb": mw.delta_mb,
            "finite": bool(np.isfinite(agg).all()), "top_shape": list(top.shape)}


def _power(n: np.ndarray, y: np.ndarray, target: float) -> tuple[float, float]:
    """Extrapolate with a power law through the two largest points: (value at target, exponent)."""
    if len(n) < 2 or y[-1] <= 0 or y[-2] <= 0:
        return float(y[-1] * target / n[-1]), 1.0
    b = float(np.log(y[-1] / y[-2]) / np.log(n[-1] / n[-2]))
    return float(y[-1] * (target / n[-1]) ** b), b


def bench_scale(settings: Settings, real: pa.Table, sizes: list[int], work: Path, quick: bool,
                max_disk_gb: float, mem_budget_gb: float, keep: bool) -> dict:
    ex = settings.extract
    vocab, hidden = 49152, 576
    width = ex.hidden_dim or hidden
    res: dict = {"real_rows": real.num_rows, "width": width, "hidden": hidden, "error_dim": ex.error_dim,
                 "vocab": vocab, "sizes": []}
    gen = SyntheticFeatures(real, vocab, width, hidden, ex.error_dim)
    rng = np.random.default_rng(7)
    real_sup = _supports(real)
    real_ov = pairwise_overlap(real_sup, rng)
    t0 = time.perf_counter()
    tried = gen.calibrate(real_ov["mean_intersection"], np.round(np.arange(0.8, 2.25, 0.1), 2),
                          n=600 if quick else 1500)
    syn_sup = gen.supports(2000)
    syn_ov = pairwise_overlap(syn_sup, np.random.default_rng(7))
    res["calibration_s"] = time.perf_counter() - t0
    res["zipf_tried"] = tried
    res["zipf_a"] = gen.a
    res["overlap"] = [
        {"features": f"real ({real.num_rows})", "mean_support": float(gen.sizes.mean()),
         "p90_support": float(np.percentile(gen.sizes, 90)), "mean_n_tokens": float(gen.n_tokens.mean()),
         "distinct_ids": int(np.unique(np.concatenate(real_sup)).size), **real_ov},
        {"features": f"synthetic (a={gen.a})", "mean_support": float(np.mean([s.size for s in syn_sup])),
         "p90_support": float(np.percentile([s.size for s in syn_sup], 90)),
         "mean_n_tokens": float(gen.n_tokens.mean()),
         "distinct_ids": int(np.unique(np.concatenate(syn_sup[:real.num_rows])).size), **syn_ov}]
    log(f"overlap real {real_ov} synthetic {syn_ov} (a={gen.a})")
    # bytes per sample, estimated before writing anything
    est = float(gen.sizes.mean()) * (width * 4 + 4) + hidden * 4 + max(ex.error_dim, 1) * 4 + 64 + 40
    res["est_bytes_per_sample"] = est
    res["est_disk_gb_1m"] = est * 1e6 / 1e9
    log(f"estimated {est:.0f} bytes/sample: 1M samples ≈ {est * 1e6 / 1e9:.1f} GB")

    ws = Workspace(str(work / "scale-ws"))  # the default consistency, as the CLI opens it
    # the synthetic validation set: 1,000 rows in their own feature table
    n_valid = 200 if quick else 1000
    fp_v = _fp("valid")
    wv = write_synthetic(ws, gen, fp_v, n_valid, 5000, "valid")
    vids = wv["ids"]
    vm, vt, _, _ = _matrix(ws, fp_v, vids, vocab, width)
    bytes_per_nnz = None  # measured on the first one-piece mean run
    bytes_per_sample = est
    for n in sizes:
        free = shutil.disk_usage(work).free
        proj = bytes_per_sample * n
        if proj > max_disk_gb * 1e9 or proj > 0.8 * free:
            log(f"N={n}: skipped, projected {proj / 1e9:.1f} GB (limit {max_disk_gb} GB, free {free / 1e9:.0f} GB)")
            res["sizes"].append({"n": n, "skipped": f"projected {proj / 1e9:.1f} GB on disk"})
            continue
        reset_hwm()
        row: dict = {"n": n}
        fp = _fp(f"train-{n}")
        table = schemas.features_table(fp)
        log(f"N={n}: writing")
        w = write_synthetic(ws, gen, fp, n, 1000 if quick else 5000, f"train-{n}")
        ids = w.pop("ids")
        row.update(w)
        row["disk_bytes"] = du_bytes(fstore.features_uri(ws, fp))
        row["bytes_per_sample"] = row["disk_bytes"] / n
        bytes_per_sample = row["bytes_per_sample"]
        log(f"N={n}: wrote {row['rows_per_s']:.0f} rows/s, {row['disk_bytes'] / 1e9:.2f} GB")
        # mean aggregate: one piece when the projected memory fits, else id chunks
        proj_mb = None if bytes_per_nnz is None else bytes_per_nnz * w["nnz"] / 2**20
        budget_mb = mem_budget_gb * 1024
        chunk = None
        if proj_mb is not None and proj_mb > budget_mb:
            chunk = max(2000, int(n * budget_mb / 2 / proj_mb) // 2000 * 2000)  # whole read_features chunks
        row["mean_one_piece_projected_mb"] = proj_mb
        log(f"N={n}: mean aggregate ({'one piece' if chunk is None else f'chunks of {chunk}'})")
        ms = mean_scoring(ws, fp, ids, vm, vt, vocab, width, chunk)
        if chunk is None:
            bytes_per_nnz = ms["rss_delta_mb"] * 2**20 / w["nnz"]
            row["mean_one_piece_projected_mb"] = ms["rss_delta_mb"]
        row["mean_bytes_per_nnz"] = bytes_per_nnz
        row.update({f"mean_{k}": v for k, v in ms.items()})
        log(f"N={n}: mean {json.dumps(ms)}")
        # unfiltered read of the same columns (what a scan costs without the id IN (...) filter)
        arrow_mb = w["nnz"] * 4 / 2**20
        if arrow_mb < budget_mb / 3:
            t0 = time.perf_counter()
            t = ws.read(table, columns=SCORE_COLS)
            row["read_nofilter_s"] = time.perf_counter() - t0
            del t
        # nearest on a subset, extrapolated
        sub = min(n, 2000 if quick else 10000)
        nr = nearest_scoring(ws, fp, ids[:sub], vm, vocab, width)
        row.update({f"nearest_{k}": v for k, v in nr.items()})
        row["nearest_extrapolated_s"] = nr["compute_s"] * n / sub
        row["nearest_matrix_gb"] = n * len(vids) * 16 / 1e9  # values (float64) + argsort (int64)
        log(f"N={n}: nearest {json.dumps(nr)}")
        row["peak_rss_mb"] = hwm_mb()
        res["sizes"].append(row)
        if not keep:
            ws.drop(table)
    res["n_valid"] = len(vids)
    res["projection_1m"] = project(res["sizes"], 1_000_000, max_disk_gb)
    return res


# --------------------------------------------------------------------------------------------------
# 4. storage (issue 19): reads by id, streaming mean, vector search settings, growth
# --------------------------------------------------------------------------------------------------

READ_CALL = 8000  # ids per read_features call, as a scoring chunk reads them (tasks/score.py SCORE_CHUNK)


def _csr(ws: Workspace, fp: str, ids: list[str], vocab: int, width: int):
    """``(len(ids), V·width)`` CSR of the sparse rows of ``ids``, in the order of ``ids``."""
    import pyarrow.compute as pc
    import scipy.sparse as sp

    t = fstore.read_features(ws, fp, ids, ["id", "token_ids", "rows"])
    t = t.take(pc.index_in(pa.array(list(ids), type=pa.string()), value_set=t.column("id")))
    indptr, indices, data = fstore.sparse_arrays(t, width)
    return sp.csr_matrix((data, indices, indptr), shape=(len(ids), vocab * width))


def read_in_chunks(ws: Workspace, table: str, ids: list[str], columns: list[str], chunk: int = 2000) -> pa.Table:
    """``read_features(ids=...)`` before issue 19: one ``id IN (...)`` query per ``chunk`` ids."""
    from valuegate.storage.lance import sql_in

    parts = [ws.read(table, where=sql_in("id", ids[i:i + chunk]), columns=columns)
             for i in range(0, len(ids), chunk)]
    return pa.concat_tables(parts)


def read_isin_scan(ws: Workspace, table: str, ids: list[str], columns: list[str]) -> pa.Table:
    """One streaming scan of ``columns``, each batch filtered with ``pyarrow.compute.is_in``."""
    import pyarrow.compute as pc

    want = pa.array(ids, type=pa.string())
    parts = []
    for b in ws.open(table).search().select(columns).to_batches(8192):
        keep = pc.is_in(b.column(columns.index("id")), value_set=want)
        if pc.any(keep).as_py():
            parts.append(pa.Table.from_batches([b.filter(keep)]))
    return pa.concat_tables(parts)


def _read_all(fn, ids: list[str], budget_s: float) -> dict:
    """Read ``ids`` (shuffled) in calls of :data:`READ_CALL` ids; stop after ``budget_s`` and extrapolate."""
    calls = [ids[i:i + READ_CALL] for i in range(0, len(ids), READ_CALL)]
    done = rows = 0
    nbytes = 0
    with MemWatch() as mw:
        t0 = time.perf_counter()
        for part in calls:
            t = fn(part)
            rows += t.num_rows
            nbytes += t.nbytes
            done += 1
            del t
            if time.perf_counter() - t0 > budget_s:
                break
        wall = time.perf_counter() - t0
    return {"s": wall * len(calls) / done, "measured_calls": done, "calls": len(calls),
            "extrapolated": done < len(calls), "rows_ok": rows == sum(len(c) for c in calls[:done]),
            "mb_per_s": nbytes / wall / 2**20, "rss_delta_mb": mw.delta_mb}


def _same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Same rows (any order): sorted by id, every column equal."""
    return a.sort_by("id").equals(b.sort_by("id"))


def bench_reads(ws: Workspace, fp: str, ids: list[str], rng: np.random.Generator, budget_s: float) -> dict:
    """Reading every id of a table in scoring-sized calls, four ways; and one 1,000-id call."""
    table = schemas.features_table(fp)
    order = [ids[i] for i in rng.permutation(len(ids))]
    few = order[:1000]
    out: dict = {}
    new = lambda part: fstore.read_features(ws, fp, part, SCORE_COLS)  # noqa: E731
    methods = {"scan_take": new,
               "in_2000": lambda part: read_in_chunks(ws, table, part, SCORE_COLS),
               "isin_scan": lambda part: read_isin_scan(ws, table, part, SCORE_COLS)}
    ref = read_in_chunks(ws, table, few, SCORE_COLS)
    for name, fn in methods.items():
        t0 = time.perf_counter()
        got = fn(few)
        out[f"{name}_1000_s"] = time.perf_counter() - t0
        out[f"{name}_same"] = _same_rows(ref, got)
        out[f"{name}_all"] = _read_all(fn, order, budget_s)
        log(f"reads {name}: {out[f'{name}_all']}")
    t0 = time.perf_counter()
    from lancedb.index import BTree

    ws.open(table).create_index("id", config=BTree())
    out["btree_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = read_in_chunks(ws, table, few, SCORE_COLS)
    out["btree_in_1000_s"] = time.perf_counter() - t0
    out["btree_in_same"] = _same_rows(ref, got)
    out["btree_in_all"] = _read_all(lambda part: read_in_chunks(ws, table, part, SCORE_COLS), order, budget_s)
    log(f"reads btree_in: {out['btree_in_all']}")
    return out


def disk_read_rate(path: Path, limit_bytes: int = 2 * 2**30) -> dict:
    """Sequential read rate of the files under ``path``: ``dd`` with ``O_DIRECT`` (the disk, not the
    page cache) and plain buffered reads (what a scan of just-written data meets)."""
    files = sorted((p for p in path.rglob("*.lance") if p.is_file()), key=lambda p: -p.stat().st_size)
    out: dict = {}
    for mode, flag in (("direct", ["iflag=direct"]), ("buffered", [])):
        total, t0 = 0, time.perf_counter()
        for f in files:
            if total >= limit_bytes:
                break
            r = subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=8M", *flag], capture_output=True, text=True)
            if r.returncode != 0:
                out[f"{mode}_error"] = r.stderr.strip().splitlines()[-1:]
                break
            total += f.stat().st_size
        wall = time.perf_counter() - t0
        out[f"{mode}_mb_per_s"] = total / wall / 2**20 if total else None
        out[f"{mode}_bytes"] = total
    return out


def scan_inner_products(ws: Workspace, fp: str, vector: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``(ids in storage order, (n,) float64)`` each stored row's inner product with ``vector``
    ``(V·width,)``, in one scan: the product ``score_streaming`` runs per batch."""
    from valuegate.engine.aggregate import block_inner_products

    ids: list[str] = []
    parts: list[np.ndarray] = []
    for batch in fstore.iter_features(ws, fp, ["id", "token_ids", "rows"]):
        tok = batch.column(1)
        parts.append(block_inner_products(tok.flatten().to_numpy(zero_copy_only=False),
                                          batch.column(2).flatten().to_numpy(zero_copy_only=False),
                                          pc.list_value_length(tok).fill_null(0).to_numpy(zero_copy_only=False),
                                          vector))
        ids += batch.column(0).to_pylist()
    return ids, (np.concatenate(parts) if parts else np.zeros(0))


def bench_stream_mean(ws: Workspace, fp: str, vm, vocab: int, width: int, disk_bytes: int) -> dict:
    """The mean aggregate of every row by one streaming scan (``iter_features`` and the scan's product,
    ``block_inner_products``), checked against ``sparse_mean_csr`` (what ``mean_aggregate`` does) on the
    CSR of the first 2,000 rows."""
    from valuegate.engine.forvalue import sparse_mean_csr

    v = np.asarray(vm.astype(np.float64).mean(axis=0)).reshape(-1)
    t0 = time.perf_counter()
    scanned = sum(b.nbytes for b in fstore.iter_features(ws, fp, ["id", "token_ids", "rows"]))
    scan_s = time.perf_counter() - t0
    with MemWatch() as mw:
        t0 = time.perf_counter()
        sids, values = scan_inner_products(ws, fp, v)
        wall = time.perf_counter() - t0
    head = sids[:2000]
    ref = sparse_mean_csr(_csr(ws, fp, head, vocab, width), vm)
    err = float(np.max(np.abs(values[:2000] - ref)) / max(1e-30, float(np.max(np.abs(ref)))))
    return {"s": wall, "rows": len(sids), "rows_per_s": len(sids) / wall, "table_mb_per_s": disk_bytes / wall / 2**20,
            "scan_only_s": scan_s, "scanned_mb": scanned / 2**20, "scan_mb_per_s": scanned / scan_s / 2**20,
            "rss_delta_mb": mw.delta_mb, "max_rel_err_vs_csr": err, "finite": bool(np.isfinite(values).all())}


def _exponents(rows: list[dict], keys: list[str]) -> list[dict]:
    """Per step ``N_i → N_{i+1}``: ``log(y_{i+1}/y_i) / log(N_{i+1}/N_i)`` of each key."""
    out = []
    for a, b in itertools.pairwise(rows):
        step = {"step": f"{a['n']:,} → {b['n']:,}"}
        for key in keys:
            ya, yb = a.get(key), b.get(key)
            if isinstance(ya, (int, float)) and isinstance(yb, (int, float)) and ya > 0 and yb > 0:
                step[key] = float(np.log(yb / ya) / np.log(b["n"] / a["n"]))
        out.append(step)
    return out


def bench_key_reads(work: Path, sizes: list[int], budget_s: float, payload: int = 256) -> dict:
    """Reads of every id in :data:`READ_CALL`-id calls from thin tables (id + ``payload`` float32s), up
    to sizes the full feature rows cannot reach here: isolates what grows faster than N, the per-query
    scan of the id column of ``id IN (...)``."""
    from lancedb.index import BTree

    ws = Workspace(str(work / "keys-ws"))
    schema = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("x", pa.list_(pa.float32()))])
    rng = np.random.default_rng(5)
    out = []
    for n in sizes:
        name = f"keys_{n}"
        ws.ensure(name, schema)
        t0 = time.perf_counter()
        for lo in range(0, n, 100_000):
            m = min(100_000, n - lo)
            ids = [hashlib.sha256(f"k{i}".encode()).hexdigest() for i in range(lo, lo + m)]
            x = pa.FixedSizeListArray.from_arrays(rng.standard_normal(m * payload, dtype=np.float32), payload)
            ws.append(name, pa.table({"id": ids, "x": x.cast(pa.list_(pa.float32()))}, schema=schema), schema)
        row: dict = {"n": n, "write_s": time.perf_counter() - t0}
        order = ws.read(name, columns=["id"])["id"].to_pylist()
        order = [order[i] for i in rng.permutation(n)]
        row["scan_take"] = _read_all(lambda part, name=name: ws.read_by_key(name, "id", part, ["id", "x"]),
                                     order, budget_s)
        row["in_2000"] = _read_all(lambda part, name=name: read_in_chunks(ws, name, part, ["id", "x"]), order,
                                   budget_s)
        ws.open(name).create_index("id", config=BTree())
        row["btree_in"] = _read_all(lambda part, name=name: read_in_chunks(ws, name, part, ["id", "x"]), order,
                                    budget_s)
        for m in ("scan_take", "in_2000", "btree_in"):
            row[f"{m}_s"] = row[m]["s"]
        log(f"key reads N={n}: " + ", ".join(f"{m} {row[m]['s']:.1f}s" for m in ("scan_take", "in_2000", "btree_in")))
        out.append(row)
        ws.drop(name)
    return {"payload_floats": payload, "sizes": out,
            "growth": _exponents(out, ["scan_take_s", "in_2000_s", "btree_in_s"])}


def print_key_reads(res: dict) -> None:
    print(f"\nreads of every id, thin rows (id + {res['payload_floats']} floats), calls of {READ_CALL:,} ids (s; * "
          "extrapolated)")
    print("| N | id IN, 2,000 per query | BTREE + IN | scan ids + take (new) |\n|---|---|---|---|")
    for r in res["sizes"]:
        c = {m: f"{r[m]['s']:.1f}{'*' if r[m]['extrapolated'] else ''}" for m in ("in_2000", "btree_in", "scan_take")}
        print(f"| {r['n']:,} | {c['in_2000']} | {c['btree_in']} | {c['scan_take']} |")
    for g in res["growth"]:
        print(f"growth {g['step']}: " + ", ".join(f"{k} N^{v:.2f}" for k, v in g.items() if k != "step"))


GROWTH_KEYS = ["write_s", "reads_scan_take_s", "reads_in_2000_s", "reads_isin_scan_s", "reads_btree_in_s",
               "stream_mean_s", "peak_rss_mb"]


def bench_storage(settings: Settings, real: pa.Table, sizes: list[int], work: Path, max_disk_gb: float,
                  read_budget_s: float) -> dict:
    """Per N: write synthetic features, read every id four ways, the streaming mean, with time and peak RSS
    per step and fitted growth exponents."""
    ex = settings.extract
    vocab, hidden = 49152, 576
    width = ex.hidden_dim or hidden
    gen = SyntheticFeatures(real, vocab, width, hidden, ex.error_dim)
    gen.set_exponent(1.3)  # about the calibrated exponent (see the scale section); overlap does not matter here
    ws = Workspace(str(work / "storage-ws"))
    fp_v = _fp("valid-storage")
    vids = write_synthetic(ws, gen, fp_v, 1000, 5000, "valid")["ids"]
    vm = _csr(ws, fp_v, vids, vocab, width)
    rng = np.random.default_rng(3)
    res: dict = {"sizes": [], "read_call_ids": READ_CALL, "read_budget_s": read_budget_s}
    per_sample = None
    for n in sizes:
        if per_sample is not None and per_sample * n > min(max_disk_gb * 1e9, 0.8 * shutil.disk_usage(work).free):
            log(f"storage N={n}: skipped ({per_sample * n / 1e9:.1f} GB projected)")
            res["sizes"].append({"n": n, "skipped": f"projected {per_sample * n / 1e9:.1f} GB"})
            continue
        reset_hwm()
        fp = _fp(f"storage-{n}")
        table = schemas.features_table(fp)
        row: dict = {"n": n}
        log(f"storage N={n}: writing")
        w = write_synthetic(ws, gen, fp, n, 5000, f"train-{n}")
        ids = w.pop("ids")
        row["write_s"] = w["write_s"]
        row["write_peak_rss_mb"] = w["write_peak_rss_mb"]
        row["disk_bytes"] = du_bytes(fstore.features_uri(ws, fp))
        per_sample = row["disk_bytes"] / n
        row["disk"] = disk_read_rate(Path(fstore.features_uri(ws, fp)))
        log(f"storage N={n}: disk {row['disk']}")
        row["stream_mean"] = sm = bench_stream_mean(ws, fp, vm, vocab, width, row["disk_bytes"])
        row["stream_mean_s"] = sm["s"]
        log(f"storage N={n}: stream mean {sm}")
        rd = bench_reads(ws, fp, ids, rng, read_budget_s)
        row["reads"] = rd
        for m in ("scan_take", "in_2000", "isin_scan", "btree_in"):
            row[f"reads_{m}_s"] = rd[f"{m}_all"]["s"]
        row["peak_rss_mb"] = hwm_mb()
        res["sizes"].append(row)
        ws.drop(table)
        (work / "storage-partial.json").write_text(json.dumps(res, default=str))
    done = [r for r in res["sizes"] if "skipped" not in r]
    res["growth"] = _exponents(done, GROWTH_KEYS)
    return res


def print_storage(res: dict) -> None:
    """The storage section's tables (markdown)."""
    done = [r for r in res["sizes"] if "skipped" not in r]
    print(f"\nreads of every id in calls of {res['read_call_ids']:,} ids (s; * extrapolated from the first "
          f"{res['read_budget_s']:.0f} s), streaming mean, peak RSS")
    print("| N | write (s) | id IN, 2,000 per query | scan + is_in | BTREE + IN | scan ids + take (new) | "
          "1,000 ids: IN / take (s) | stream mean (s) | scan alone (s, MB/s) | disk direct / buffered MB/s | "
          "peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in done:
        rd = r["reads"]

        def cell(m: str, rd: dict = rd) -> str:
            a = rd[f"{m}_all"]
            return f"{a['s']:.1f}{'*' if a['extrapolated'] else ''}"
        d = r["disk"]
        print(f"| {r['n']:,} | {r['write_s']:.0f} | {cell('in_2000')} | {cell('isin_scan')} | {cell('btree_in')} | "
              f"{cell('scan_take')} | {rd['in_2000_1000_s']:.2f} / {rd['scan_take_1000_s']:.2f} | "
              f"{r['stream_mean']['s']:.1f} | {r['stream_mean']['scan_only_s']:.1f}, "
              f"{r['stream_mean']['scan_mb_per_s']:.0f} | "
              f"{d.get('direct_mb_per_s') or 0:.0f} / {d.get('buffered_mb_per_s') or 0:.0f} | {r['peak_rss_mb']:.0f} |")
    if res.get("growth"):
        keys = [k for k in GROWTH_KEYS if any(k in g for g in res["growth"])]
        print("\ngrowth exponents per step (time ∝ N^b)")
        print("| step | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
        for g in res["growth"]:
            print(f"| {g['step']} | " + " | ".join(f"{g[k]:.2f}" if k in g else "" for k in keys) + " |")


# --------------------------------------------------------------------------------------------------
# 4b. scoring with the signals off (issue 19): the mean by one streaming scan, nearest by candidates
# --------------------------------------------------------------------------------------------------


def _rows_csr(rows: list[dict], vocab: int, width: int):
    """``(n, V·width)`` CSR of feature-row dicts, their values rounded to the stored float16."""
    import scipy.sparse as sp

    lens = [r["token_ids"].size * width for r in rows]
    idx = [(r["token_ids"].astype(np.int64)[:, None] * width + np.arange(width)).reshape(-1) for r in rows]
    data = np.concatenate([np.asarray(r["rows"], dtype=np.float16).astype(np.float32) for r in rows])
    return sp.csr_matrix((data, np.concatenate(idx), np.concatenate([[0], np.cumsum(lens)])),
                         shape=(len(rows), vocab * width))


def write_sketched(ws: Workspace, gen: SyntheticFeatures, fp: str, n: int, batch: int, prefix: str, dim: int,
                   seed: int) -> dict:
    """Synthetic feature rows with their ``sketch`` column, as the extraction stores them."""
    from valuegate.engine.sketch import count_sketch

    fstore.ensure_feature_set(ws, fp, {"synthetic": prefix, "n": n}, gen.hidden, gen.vocab, gen.width,
                              gen.error_dim, sketch_dim=dim)
    ids: list[str] = []
    gen_s = sketch_s = write_s = 0.0
    for lo in range(0, n, batch):
        t0 = time.perf_counter()
        rows = gen.rows(min(batch, n - lo), prefix, lo)
        gen_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for r, s in zip(rows, count_sketch(_rows_csr(rows, gen.vocab, gen.width), dim, seed=seed), strict=True):
            r["sketch"] = s
        sketch_s += time.perf_counter() - t0
        ids += [r["id"] for r in rows]
        t0 = time.perf_counter()
        fstore.write_features(ws, fp, rows, gen.hidden, gen.error_dim, sketch_dim=dim)
        write_s += time.perf_counter() - t0
    return {"ids": ids, "gen_s": gen_s, "sketch_s": sketch_s, "write_s": write_s}


def _scoring_settings(settings: Settings, **score) -> Settings:
    return settings.model_copy(update={"score": settings.score.model_copy(update={"signals": False, **score})})


def _chunked(ws: Workspace, plan, settings: Settings, ids: list[str], csr: bool = False) -> tuple[pa.Table, float, float]:
    """What score_dataset does without the scan: read by id and score chunk by chunk (``csr``: the value
    matrix by the CSR product, not the token groups)."""
    from valuegate.tasks.score import SCORE_CHUNK, load_context, score_rows

    ctx = load_context(ws, plan, settings)
    if csr:
        ctx.groups = None
    tables, t_read, t_score = [], 0.0, 0.0
    for lo in range(0, len(ids), SCORE_CHUNK):
        t, r, s = score_rows(ws, plan, ctx, settings, ids[lo:lo + SCORE_CHUNK])
        tables.append(t.select(["id", "value", "nearest_ids"]))
        t_read += r
        t_score += s
    return pa.concat_tables(tables), t_read, t_score


def recall_rows(real: pa.Table, workspace: Path | None) -> pa.Table:
    """The real rows for the recall: ``real`` and every feature row of ``workspace``'s feature tables
    (e.g. a demo workspace), as ``token_ids``, float32 ``rows``, ``n_tokens``."""
    cols = ["token_ids", "rows", "n_tokens"]
    schema = pa.schema([pa.field("token_ids", pa.list_(pa.int32())), pa.field("rows", pa.list_(pa.float32())),
                        pa.field("n_tokens", pa.int64())])
    parts = [real.select(cols).cast(schema)]
    if workspace is not None:
        ws = Workspace(str(workspace))
        for name in ws.table_names():
            if name.startswith("features__"):  # float32 rows, whatever the table's format stored
                fetch = [c for c in fstore.with_scales(cols) if c in ws.schema(name).names]
                parts.append(fstore.dequantized(ws.read(name, columns=fetch), cols).cast(schema))
    return pa.concat_tables(parts)


def real_candidate_recall(real: pa.Table, settings: Settings, vocab: int, width: int, n_train: int = 100,
                          cs: tuple[int, ...] = (25, 50, 100), dims: tuple[int, ...] = (256, 1024)) -> dict:
    """On real rows (``n_train`` random ones the training side, the rest the validation side): the recall
    of the exact top k among C candidates by D-float sketches through ``score_chunk``, per D, C and
    normalisation (keys ``{normalize}_D{D}_C{C}``)."""
    import scipy.sparse as sp

    from valuegate.engine.aggregate import build_context, score_chunk

    indptr, indices, data = fstore.sparse_arrays(real, width)
    m = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(real.num_rows, vocab * width))
    pick = np.zeros(real.num_rows, dtype=bool)
    pick[np.random.default_rng(7).choice(real.num_rows, size=min(n_train, real.num_rows // 2), replace=False)] = True
    tr, va = m[pick], m[~pick]
    self_inf = np.asarray(m.multiply(m).sum(1)).reshape(-1)
    tok = real.column("n_tokens").to_numpy().astype(np.int64)
    out = {"n_train": tr.shape[0], "n_valid": va.shape[0], "k": settings.score.nearest_k}
    cols = (self_inf[pick], tok[pick], np.zeros(tr.shape[0]), np.zeros((tr.shape[0], 2)))

    def nearest(s: Settings) -> np.ndarray:
        ctx = build_context([str(j) for j in range(va.shape[0])], self_inf[~pick], tok[~pick],
                            np.ones((va.shape[0], 2)), s, 2, vocab, vm=va, width=width)
        return score_chunk(ctx, s.score, *cols, train_csr=tr).nearest

    for how in ("none", "length", "cosine"):
        ref = nearest(_scoring_settings(settings, aggregate="nearest", normalize=how, nearest_candidates=0))
        for d, c in itertools.product(dims, cs):
            s = _scoring_settings(settings, aggregate="nearest", normalize=how, nearest_candidates=c)
            s = s.model_copy(update={"extract": s.extract.model_copy(update={"sketch_dim": d})})
            got = nearest(s)
            out[f"{how}_D{d}_C{c}"] = float(np.mean([len(set(a) & set(b)) / len(b)
                                                     for a, b in zip(got, ref, strict=True)]))
    return out


SCORING_GROWTH = ["mean_stream_s", "mean_stream_cpu_s", "mean_chunked_s", "nearest_s", "nearest_cpu_s",
                  "nearest_score_s", "candidates_s", "exhaustive_s", "peak_rss_mb"]


def _recall(got: pa.Table, ref: pa.Table) -> float:
    """Mean share of each ``ref`` row's ``nearest_ids`` among ``got``'s for the same id."""
    pos = {i: p for p, i in enumerate(got.column("id").to_pylist())}
    g = got.column("nearest_ids").to_pylist()
    return float(np.mean([len(set(g[pos[i]]) & set(e)) / len(e) for i, e in
                          zip(ref.column("id").to_pylist(), ref.column("nearest_ids").to_pylist(), strict=True)]))


def bench_scoring(settings: Settings, real: pa.Table, sizes: list[int], work: Path, max_disk_gb: float,
                  oracle_rows: int = 400, recall_workspace: Path | None = None, candidates: int = 50) -> dict:
    """Per N: synthetic rows (sketch column included) against 1,000 validation rows, signals off:
    the ``mean`` aggregate by one streaming scan (``score_streaming``, what ``score_dataset`` runs) and by
    the chunked reads by id, against the disk's sequential read rate; the ``nearest`` aggregate exactly
    by token groups (the default, ``nearest_candidates = 0``) and by ``candidates`` sketch candidates
    over every row (the recall of the exact top k), and the CSR product (the oracle before the token
    groups) on ``oracle_rows`` rows, its time extrapolated to N; peak RSS; the fitted growth exponents.
    The synthetic rows have no neighbourhood structure (their exact top k is set by noise), so their
    recall is a worst case; the recall on real rows is measured apart."""
    from valuegate.engine.aggregate import sketch_dim
    from valuegate.tasks.score import ScoringPlan, load_context, score_streaming

    ex, sc = settings.extract, settings.score
    vocab, hidden = 49152, 576
    width = ex.hidden_dim or hidden
    dim = sketch_dim(settings)
    gen = SyntheticFeatures(real, vocab, width, hidden, ex.error_dim)
    gen.set_exponent(1.3)
    ws = Workspace(str(work / "scoring-ws"))
    fp_v = _fp("valid-scoring")
    vids = write_sketched(ws, gen, fp_v, 1000, 5000, "valid", dim, ex.seed)["ids"]
    s_mean = _scoring_settings(settings, aggregate="mean")
    s_near = _scoring_settings(settings, aggregate="nearest", nearest_candidates=0)
    s_cand = _scoring_settings(settings, aggregate="nearest", nearest_candidates=candidates)
    res: dict = {"sizes": [], "n_valid": len(vids), "sketch_dim": dim, "candidates": candidates,
                 "k": sc.nearest_k, "oracle_rows": oracle_rows,
                 "real_recall": real_candidate_recall(recall_rows(real, recall_workspace), settings, vocab, width)}
    log(f"scoring: real-row recall {res['real_recall']}")
    rng = np.random.default_rng(11)
    per_sample = None
    for n in sizes:
        if per_sample is not None and per_sample * n > min(max_disk_gb * 1e9, 0.8 * shutil.disk_usage(work).free):
            res["sizes"].append({"n": n, "skipped": f"projected {per_sample * n / 1e9:.1f} GB"})
            log(f"scoring N={n}: skipped")
            continue
        reset_hwm()
        fp = _fp(f"scoring-{n}")
        row: dict = {"n": n, "loadavg": list(os.getloadavg())}
        log(f"scoring N={n}: writing")
        w = write_sketched(ws, gen, fp, n, 5000, f"train-{n}", dim, ex.seed)
        ids = w.pop("ids")
        row["write"] = w
        row["write_peak_rss_mb"] = hwm_mb()
        log(f"scoring N={n}: written {w}")
        row["disk_bytes"] = du_bytes(fstore.features_uri(ws, fp))
        per_sample = row["disk_bytes"] / n
        row["disk"] = disk_read_rate(Path(fstore.features_uri(ws, fp)))
        plan = ScoringPlan(ws.uri, "bench", "val@v1", vids, ids, fp, fp_v, vocab, width, hidden, f"bench-{n}", "{}")
        # mean: the streaming scan (score_dataset's path) and the chunked reads by id
        with MemWatch() as mw:
            t0, c0 = time.perf_counter(), time.process_time()
            ctx = load_context(ws, plan, s_mean)
            streamed, _ = score_streaming(ws, plan, ctx, s_mean)
            row["mean_stream_s"] = time.perf_counter() - t0
            row["mean_stream_cpu_s"] = time.process_time() - c0
        row["mean_stream_rss_delta_mb"] = mw.delta_mb
        row["mean_stream_mb_per_s"] = row["disk_bytes"] / row["mean_stream_s"] / 2**20
        t0, c0 = time.perf_counter(), time.process_time()
        chunked, r, s = _chunked(ws, plan, s_mean, ids)
        row["mean_chunked_s"] = time.perf_counter() - t0
        row["mean_chunked_cpu_s"] = time.process_time() - c0
        row["mean_chunked_read_s"], row["mean_chunked_score_s"] = r, s
        a, b = streamed.column("value").to_numpy(), chunked.column("value").to_numpy()
        row["mean_stream_vs_chunked_max_rel"] = float(np.max(np.abs(a - b)) / max(1e-300, float(np.max(np.abs(b)))))
        log(f"scoring N={n}: mean stream {row['mean_stream_s']:.1f}s chunked {row['mean_chunked_s']:.1f}s, "
            f"disk {row['disk']}")
        # nearest: exact by token groups (the default) and by C candidates, over every row; the CSR
        # product (the oracle before the token groups) on a sample
        t0, c0 = time.perf_counter(), time.process_time()
        exact, r, s = _chunked(ws, plan, s_near, ids)
        row["nearest_s"] = time.perf_counter() - t0
        row["nearest_cpu_s"] = time.process_time() - c0
        row["nearest_read_s"], row["nearest_score_s"] = r, s
        t0, c0 = time.perf_counter(), time.process_time()
        cand, r, s = _chunked(ws, plan, s_cand, ids)
        row["candidates_s"] = time.perf_counter() - t0
        row["candidates_cpu_s"] = time.process_time() - c0
        row["candidates_read_s"], row["candidates_score_s"] = r, s
        sample = [ids[i] for i in np.sort(rng.choice(n, size=min(oracle_rows, n), replace=False))]
        splan = ScoringPlan(ws.uri, "bench", "val@v1", vids, sample, fp, fp_v, vocab, width, hidden, "o", "{}")
        t0 = time.perf_counter()
        csr, _, s_csr = _chunked(ws, splan, s_near, sample, csr=True)
        row["csr_sample_s"] = time.perf_counter() - t0
        row["csr_score_per_row_ms"] = 1000 * s_csr / len(sample)
        row["exhaustive_s"] = s_csr / len(sample) * n  # the CSR products alone, extrapolated to N
        row["nearest_score_per_row_ms"] = 1000 * row["nearest_score_s"] / n
        row["candidates_score_per_row_ms"] = 1000 * row["candidates_score_s"] / n
        row["recall"] = _recall(cand, exact)
        row["groups_equal_csr"] = _recall(exact, csr) == 1.0
        log(f"scoring N={n}: nearest exact {row['nearest_s']:.1f}s (read {row['nearest_read_s']:.1f}, score "
            f"{row['nearest_score_s']:.1f}), {row['nearest_score_per_row_ms']:.3f} ms/row; candidates "
            f"{row['candidates_s']:.1f}s, recall {row['recall']:.3f}; CSR {row['csr_score_per_row_ms']:.2f} ms/row, "
            f"same top k as the groups: {row['groups_equal_csr']}")
        row["peak_rss_mb"] = hwm_mb()
        res["sizes"].append(row)
        ws.drop(schemas.features_table(fp))
        (work / "scoring-partial.json").write_text(json.dumps(res, default=str))
    done = [r for r in res["sizes"] if "skipped" not in r]
    res["growth"] = _exponents(done, SCORING_GROWTH)
    if done:
        last = done[-1]
        res["projected_1m"] = {k: _power(np.array([r["n"] for r in done], dtype=float),
                                         np.array([r[k] for r in done], dtype=float), 1_000_000)
                               for k in ("mean_stream_s", "mean_stream_cpu_s", "mean_chunked_s", "nearest_s",
                                         "nearest_cpu_s", "candidates_s", "exhaustive_s")
                               if all(r.get(k, 0) > 0 for r in done)}
        res["last_n"] = last["n"]
    return res


def print_scoring(res: dict) -> None:
    """The scoring section's tables (markdown)."""
    done = [r for r in res["sizes"] if "skipped" not in r]
    print(f"\nsignals off, {res['n_valid']:,} validation rows; nearest: k={res['k']}, exact by token groups and by "
          f"C={res['candidates']} candidates of {res['sketch_dim']}-float sketches (recall of the exact top k, every row)")
    print("| N | disk | mean, one scan (s, MB/s; CPU s) | mean, reads by id (s; CPU s) | disk direct / buffered MB/s | "
          "nearest exact (s: read, score; CPU s) | nearest by candidates (s; CPU s) | recall | CSR product (s, extrapolated) | "
          "ms/row: exact / candidates / CSR | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in done:
        d = r["disk"]
        print(f"| {r['n']:,} | {r['disk_bytes'] / 1e9:.2f} GB | {r['mean_stream_s']:.1f}, {r['mean_stream_mb_per_s']:.0f}; "
              f"{r['mean_stream_cpu_s']:.1f} | {r['mean_chunked_s']:.1f}; {r['mean_chunked_cpu_s']:.1f} | "
              f"{d.get('direct_mb_per_s') or 0:.0f} / {d.get('buffered_mb_per_s') or 0:.0f} | "
              f"{r['nearest_s']:.1f}: {r['nearest_read_s']:.1f}, {r['nearest_score_s']:.1f}; CPU {r['nearest_cpu_s']:.1f} | "
              f"{r['candidates_s']:.1f}; CPU {r['candidates_cpu_s']:.1f} | {r['recall']:.3f} | {r['exhaustive_s']:.0f} | "
              f"{r['nearest_score_per_row_ms']:.3f} / {r['candidates_score_per_row_ms']:.3f} / "
              f"{r['csr_score_per_row_ms']:.2f} | {r['peak_rss_mb']:.0f} |")
    for g in res.get("growth", []):
        print(f"growth {g['step']}: " + ", ".join(f"{k} N^{v:.2f}" for k, v in g.items() if k != "step"))
    for k, (v, b) in res.get("projected_1m", {}).items():
        print(f"projected to 1M: {k} {v:.0f} s (N^{b:.2f})")
    print(f"recall on real rows: {res['real_recall']}")


# --------------------------------------------------------------------------------------------------
# 5. feature row layout candidates (issue 19): bytes per sample and fidelity, on real extracted rows
# --------------------------------------------------------------------------------------------------


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and back."""
    b = x.astype(np.float32).view(np.uint32)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return b.view(np.float32)


def _int8_blocks(r: np.ndarray) -> np.ndarray:
    """``(|U|, width)`` rows rounded to int8 with one scale per support entry (its max |value| / 127),
    and back to float32."""
    scale = np.abs(r).max(axis=1, keepdims=True) / np.float32(127)
    q = np.rint(np.divide(r, scale, out=np.zeros_like(r), where=scale > 0))
    return (q * scale).astype(np.float32)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _features_of(real: pa.Table, width: int) -> list:
    """The engine's :class:`SparseFeatures` of real feature rows (float32 rows, as extracted)."""
    from valuegate.engine.forvalue import SparseFeatures

    def arr(v, dt) -> np.ndarray:
        return np.asarray(v, dtype=dt)

    out = []
    for r in real.to_pylist():
        hard = None
        if r.get("hard_rows") is not None:
            hard = SparseFeatures(arr(r["hard_token_ids"], np.int32), arr(r["hard_rows"], np.float32).reshape(-1, width),
                                  r["hard_n_tokens"], r["hard_mean_loss"], 0.0, 0.0, np.zeros(0, np.float32),
                                  np.zeros(0, np.float32), arr(r["hard_error_sum"], np.float32))
        out.append(SparseFeatures(arr(r["token_ids"], np.int32), arr(r["rows"], np.float32).reshape(-1, width),
                                  r["n_tokens"], r["mean_loss"], r["dropped_mass"], r["self_influence"],
                                  arr(r["mean_hidden"], np.float32), arr(r["pooled_error"], np.float32),
                                  arr(r["error_sum"], np.float32), hard))
    return out


def stored_bytes(real: pa.Table, width: int, work: Path, copies: int = 5,
                 variants=((0, 0), (0, 128), (256, 0))) -> list[dict]:
    """Bytes per sample on disk (``du`` of the Lance table) of the real rows written ``copies`` times (new
    ids) as the store writes them: feature format 4 (float32 rows, the columns before the format-5 change)
    and the current format (:func:`~valuegate.engine.extraction.stored_features` then ``write_features``)
    with each ``(sketch_dim, error_dim)`` of ``variants`` (the defaults are 0 and 0); and the seconds per
    sample of the stored form (rounding, self-influence, sketch)."""
    from valuegate.engine.extraction import stored_features
    from valuegate.settings import ExtractSettings
    from valuegate.tasks.extract import feature_row

    hidden = len(real["mean_hidden"][0])
    ws = Workspace(str(work / "layout-ws"))
    out = []
    old_schema = float32_rows_schema(schemas.features_schema(hidden, len(real["pooled_error"][0])))
    old = pa.concat_tables([real.select(old_schema.names).set_column(
        0, "id", pa.array([f"c{c}-{i}" for i in range(real.num_rows)])).cast(old_schema) for c in range(copies)])
    ws.ensure("features__format4", old_schema)
    ws.upsert("features__format4", old, on="id", update=False)
    out.append({"format": 4, "rows": "float32", "sketch_dim": 0, "error_dim": len(real["pooled_error"][0]),
                "bytes_per_sample": du_bytes(f"{ws.uri}/features__format4.lance") / old.num_rows})
    uncond = real["uncond_loss"].to_pylist() if "uncond_loss" in real.column_names else [None] * real.num_rows
    rng = np.random.default_rng(0)
    for dim, error_dim in variants:
        fp = f"s{dim}e{error_dim}".ljust(64, "0")  # one table per variant (the name keeps 16 characters)
        t0 = time.perf_counter()
        feats = stored_features(_features_of(real, width), ExtractSettings(hidden_dim=width, sketch_dim=dim))
        t_form = (time.perf_counter() - t0) / real.num_rows
        for f in feats:  # the pooled error vector as extracted at this width (nothing reads its values)
            f.pooled_error = rng.standard_normal(error_dim).astype(np.float32)
        for c in range(copies):
            rows = [feature_row(f"c{c}-{i}", f, 0, 0.0, False, uncond[i]) for i, f in enumerate(feats)]
            fstore.write_features(ws, fp, rows, hidden, error_dim, dim)
        path = fstore.features_uri(ws, fp)
        out.append({"format": schemas.FEATURE_FORMAT, "rows": schemas.STORED_ROW_DTYPE, "sketch_dim": dim,
                    "error_dim": error_dim, "bytes_per_sample": du_bytes(path) / (copies * real.num_rows),
                    "stored_form_ms_per_sample": 1000 * t_form})
        log(f"stored bytes {out[-1]}")
    return out


def bench_layout(real: pa.Table, width: int, vocab: int = 49152, n_valid: int = 40,
                 work: Path | None = None) -> dict:
    """Candidate feature-row layouts on real extracted rows: bytes per sample (the columns as stored,
    with the candidate's ``rows``/``hard_rows``/``mean_hidden`` sizes) and the Spearman correlation
    of the ``mean`` and ``nearest`` aggregates against the float32 rows (format 4) (a proxy: the fidelity bar
    of issue 19 is against exact scores and the DataInf AUCs, which need the model).

    The first ``n_valid`` rows of each half (the two DataInf tasks) play the validation set."""
    import scipy.sparse as sp

    n = real.num_rows
    half = n // 2
    vpos = [*range(n_valid // 2), *range(half, half + n_valid // 2)]
    tpos = [i for i in range(n) if i not in set(vpos)]
    tok = real.column("token_ids").to_pylist()
    rows = [np.asarray(r, dtype=np.float32).reshape(-1, width) for r in real.column("rows").to_pylist()]
    col_bytes = {c: real.column(c).nbytes / n for c in real.column_names}
    base_bytes = sum(col_bytes.values())
    n_tok = real.column("n_tokens").to_numpy().astype(float)
    sup = np.array([len(t) for t in tok], dtype=float)

    def csr(pos: list[int], rws: list[np.ndarray], w: int) -> sp.csr_matrix:
        data = np.concatenate([rws[i].reshape(-1) for i in pos]).astype(np.float64)
        idx = np.concatenate([(np.asarray(tok[i], dtype=np.int64)[:, None] * w + np.arange(w)).reshape(-1)
                              for i in pos])
        ptr = np.concatenate([[0], np.cumsum([rws[i].size for i in pos])])
        return sp.csr_matrix((data, idx, ptr), shape=(len(pos), vocab * w))

    def values(rws: list[np.ndarray], w: int) -> np.ndarray:
        return np.asarray((csr(tpos, rws, w) @ csr(vpos, rws, w).T).todense())

    ref = values(rows, width)
    ref_mean, ref_near = ref.mean(1), ref.max(1)
    rng = np.random.default_rng(0)
    out = []

    def add(name: str, rws: list[np.ndarray], w: int, row_bytes_per_float: float, note: str = "",
            ph_bytes: float = 4.0) -> None:
        v = values(rws, w)
        floats = sum(r.size for r in rws) / n
        hard_floats = col_bytes["hard_rows"] / 4 * (w / width)
        size = (base_bytes - col_bytes["rows"] - col_bytes["hard_rows"] - col_bytes["mean_hidden"]
                + (floats + hard_floats) * row_bytes_per_float + col_bytes["mean_hidden"] * ph_bytes / 4)
        out.append({"layout": name, "bytes_per_sample": size, "spearman_mean": _spearman(v.mean(1), ref_mean),
                    "spearman_nearest": _spearman(v.max(1), ref_near),
                    "max_rel_err": float(np.abs(v - ref).max() / np.abs(ref).max()), "note": note})
        log(f"layout {out[-1]}")

    add("float32 (format 4)", rows, width, 4)
    add("float16 rows, fp32 accumulation", [r.astype(np.float16).astype(np.float32) for r in rows], width, 2)
    add("bfloat16 rows, fp32 accumulation", [_bf16(r) for r in rows], width, 2)
    add("float16 rows + float16 mean_hidden", [r.astype(np.float16).astype(np.float32) for r in rows],
        width, 2, ph_bytes=2)
    # int8 rows with one float32 scale per support entry (max |block| / 127): 1 + 4/width bytes a float
    add("int8 rows, float32 scale per support entry", [_int8_blocks(r) for r in rows], width, 1 + 4 / width)
    add("int8 rows + float16 mean_hidden", [_int8_blocks(r) for r in rows], width, 1 + 4 / width, ph_bytes=2)
    for k in (64, 32):
        g = rng.standard_normal((width, k)).astype(np.float32) / np.float32(np.sqrt(k))
        add(f"k_h {width}→{k} (Gaussian)", [r @ g for r in rows], k, 4)
        add(f"k_h {width}→{k}, float16", [(r @ g).astype(np.float16).astype(np.float32) for r in rows], k, 2,
            ph_bytes=2)
    for keep in (0.95, 0.9):  # the support entries of largest row norm holding `keep` of the squared mass
        pruned = []
        for r in rows:
            m = (r.astype(np.float64) ** 2).sum(1)
            order = np.argsort(-m)
            cut = int(np.searchsorted(np.cumsum(m[order]) / max(m.sum(), 1e-30), keep) + 1)
            z = np.zeros_like(r)
            z[order[:cut]] = r[order[:cut]]
            pruned.append(z)
        kept = sum(int((np.abs(z).sum(1) > 0).sum()) for z in pruned) / sum(r.shape[0] for r in rows)
        v_rows = [z[np.abs(z).sum(1) > 0] for z in pruned]  # what would be stored
        add(f"support pruned to {keep:.0%} of the row mass", pruned, width, 4 * kept,
            note=f"{kept:.0%} of the entries kept")
        del v_rows
    # per-token factors: R = A[:, U]ᵀ (H P_hᵀ) stored as A[:, U] (T × |U|) and H P_hᵀ (T × k_h); exact,
    # so only its size is computed here (hard rows are a subset of the same positions: indices only)
    fac = float(np.mean(n_tok * sup + n_tok * width))
    hard_idx = col_bytes["hard_token_ids"]
    for label, b in (("float32", 4), ("float16", 2)):
        size = (base_bytes - col_bytes["rows"] - col_bytes["hard_rows"] - col_bytes["mean_hidden"]
                + fac * b + hard_idx + col_bytes["mean_hidden"] * b / 4)
        out.append({"layout": f"per-token factors, {label} (size only)", "bytes_per_sample": size,
                    "spearman_mean": None, "spearman_nearest": None, "max_rel_err": None,
                    "note": f"exact in float32; mean T={n_tok.mean():.1f}, |U|={sup.mean():.1f}; needs extraction "
                            "changes (engine) and a FEATURE_FORMAT bump"})
    return {"rows": n, "n_valid": len(vpos), "column_bytes_per_sample": col_bytes, "candidates": out,
            "nearest_candidates": nearest_candidate_recall(real, rows, tok, width, vocab),
            "stored": stored_bytes(real, width, work) if work is not None else []}


def nearest_candidate_recall(real: pa.Table, rows: list[np.ndarray], tok: list, width: int, vocab: int,
                             k: int = 5, cands: tuple[int, ...] = (10, 25, 50, 100)) -> list[dict]:
    """Candidates for the ``nearest`` aggregate from the dense pooled vectors: every real row against all
    others, the share of its exact top-``k`` (sparse values) found among the ``C`` others of largest
    ``Σ_t h_t`` dot product (what format 6 stored), and of largest cosine of the mean hidden states."""
    import scipy.sparse as sp

    n = real.num_rows
    data = np.concatenate([r.reshape(-1) for r in rows]).astype(np.float64)
    idx = np.concatenate([(np.asarray(t, dtype=np.int64)[:, None] * width + np.arange(width)).reshape(-1)
                          for t in tok])
    ptr = np.concatenate([[0], np.cumsum([r.size for r in rows])])
    m = sp.csr_matrix((data, idx, ptr), shape=(n, vocab * width))
    v = np.asarray((m @ m.T).todense())
    np.fill_diagonal(v, -np.inf)
    truth = np.argsort(-v, axis=1)[:, :k]
    mean_h = real.column("mean_hidden").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(n, -1)
    mean_h = mean_h.astype(np.float64)
    ph = mean_h * real.column("n_tokens").to_numpy()[:, None]  # Σ_t h_t, what format 6 stored
    unit = mean_h / np.maximum(np.linalg.norm(mean_h, axis=1, keepdims=True), 1e-30)
    out = []
    sims = [("pooled dot", ph @ ph.T), ("mean-hidden cosine", unit @ unit.T)]
    for dim in (256, 1024, 4096):  # a count sketch of the sparse rows (a dense vector with the same dot)
        sk = count_sketch(m, dim)
        sims.append((f"count sketch of the rows, {dim} floats", sk @ sk.T))
    # as feature format 5 stores it: the sketch of the float16 rows, itself in float16
    m16 = m.copy()
    m16.data = m16.data.astype(np.float16).astype(np.float64)
    sk16 = count_sketch(m16, 256).astype(np.float16).astype(np.float64)
    sims.append(("count sketch, 256 floats, as stored (float16 rows and sketch)", sk16 @ sk16.T))
    for label, sim in sims:
        np.fill_diagonal(sim, -np.inf)
        order = np.argsort(-sim, axis=1)
        for c in cands:
            if c >= n:
                continue
            hit = np.mean([len(set(truth[i]) & set(order[i, :c])) / k for i in range(n)])
            out.append({"by": label, "candidates": c, "of": n - 1, f"recall_top{k}": float(hit)})
    log(f"nearest candidates {out}")
    return out


def print_layout(res: dict) -> None:
    print(f"\nfeature row layouts on {res['rows']} real rows ({res['n_valid']} as validation); Spearman against "
          "the float32 rows (format 4)")
    print("| layout | bytes/sample | Spearman mean | Spearman nearest | max rel err | note |\n|---|---|---|---|---|---|")
    for c in res["candidates"]:
        f = (lambda x: "" if x is None else f"{x:.4f}")  # noqa: E731
        print(f"| {c['layout']} | {c['bytes_per_sample'] / 1024:.1f} KB | {f(c['spearman_mean'])} | "
              f"{f(c['spearman_nearest'])} | {f(c['max_rel_err'])} | {c['note']} |")
    if res.get("stored"):
        print("\nbytes per sample on disk (Lance), the real rows as each feature format writes them")
        print("| format | rows | sketch floats | pooled error floats | bytes/sample | stored form (ms/sample) |\n"
              "|---|---|---|---|---|---|")
        for r in res["stored"]:
            ms = r.get("stored_form_ms_per_sample")
            print(f"| {r['format']} | {r['rows']} | {r['sketch_dim']} | {r.get('error_dim', '')} | "
                  f"{r['bytes_per_sample']:,.0f} | {'' if ms is None else f'{ms:.2f}'} |")
    print("\nnearest: recall of each row's exact top 5 among its C candidates by a dense similarity")
    print("| candidates by | C | of | recall |\n|---|---|---|---|")
    for c in res.get("nearest_candidates", []):
        print(f"| {c['by']} | {c['candidates']} | {c['of']} | {c['recall_top5']:.3f} |")


# quantities that touch every row: never extrapolated below linear growth (noise can make the measured
# exponent < 1, e.g. a fixed-size IVF training sample dominating the index build at these sizes)
_AT_LEAST_LINEAR = ("disk_bytes", "write_s", "mean_read_s", "mean_matrix_s", "mean_aggregate_s",
                    "nearest_extrapolated_s")


def project(rows: list[dict], target: int, max_disk_gb: float | None = None) -> dict:
    done = [r for r in rows if "skipped" not in r]
    if not done:
        return {}
    n = np.array([r["n"] for r in done], dtype=float)
    g = {k: np.array([r.get(k, np.nan) for r in done], dtype=float) for k in done[-1]
         if isinstance(done[-1][k], (int, float)) and not isinstance(done[-1][k], bool)}
    out: dict = {"n": target, "measured_up_to": int(n[-1]),
                 "method": "power law through the two largest sizes, exponent at least 1 for what touches "
                           "every row"}
    for key in _AT_LEAST_LINEAR:
        if key in g and np.isfinite(g[key]).all():
            v, b = _power(n, g[key], target)
            if key in _AT_LEAST_LINEAR and b < 1.0:
                v, b = float(g[key][-1] * target / n[-1]), 1.0
            out[key] = v
            out[f"{key}_exponent"] = b
    if max_disk_gb is not None and "disk_bytes" in out:
        out["fits_disk_limit"] = bool(out["disk_bytes"] <= max_disk_gb * 1e9)
        out["max_disk_gb"] = max_disk_gb
    nnz_per_sample = done[-1]["nnz"] / done[-1]["n"]
    bpn = done[-1].get("mean_bytes_per_nnz")
    if bpn:
        out["mean_one_piece_mb"] = bpn * nnz_per_sample * target / 2**20
    out["nearest_matrix_gb"] = done[-1]["nearest_matrix_gb"] * target / done[-1]["n"]
    return out


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--quick", action="store_true", help="a tenth of the data (a smoke run)")
    ap.add_argument("--only", choices=["incremental", "rescore", "scale", "storage", "layout", "scoring"],
                    default=None)
    ap.add_argument("--scoring-sizes", default="10000,100000", help="comma-separated N of the scoring section")
    ap.add_argument("--recall-workspace", type=Path, default=None,
                    help="scoring: a workspace whose feature rows join the real rows of the candidates' recall")
    ap.add_argument("--storage-sizes", default="10000,100000", help="comma-separated N of the storage section")
    ap.add_argument("--read-budget-s", type=float, default=60.0,
                    help="storage: seconds per read method and size before extrapolating the rest")
    ap.add_argument("--key-read-sizes", default="100000,1000000",
                    help="storage: N of the thin-row reads by id (empty: skip)")
    ap.add_argument("--real-cache", type=Path, default=None,
                    help="parquet of real extracted features: read if it exists, else written after extracting")
    ap.add_argument("--scale-sizes", default="10000,100000", help="comma-separated N of the scale section")
    ap.add_argument("--max-disk-gb", type=float, default=20.0, help="skip a size projected to need more")
    ap.add_argument("--mem-budget-gb", type=float, default=5.0,
                    help="score in id chunks when one piece is projected to need more memory than this")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temp workspaces go")
    ap.add_argument("--keep", action="store_true", help="keep the temp workspaces")
    a = ap.parse_args()
    if not (a.data / "grammars_train.jsonl").exists():
        raise SystemExit(f"benchmark data not found in {a.data} (give --data DIR)")
    start_watchdog()
    t_start = time.perf_counter()
    settings = default_settings()
    work = Path(tempfile.mkdtemp(prefix="vg-bench-store-", dir=a.workdir))
    out: dict = {"machine": machine(), "model": settings.model.name, "defaults": settings.extract.model_dump(),
                 "quick": a.quick, "workdir": str(work), "loadavg_start": list(os.getloadavg())}
    log(f"workdir {work}")
    try:
        fp = ws = None
        if a.only in (None, "incremental", "rescore"):
            n_first, n_new, n_valid = (100, 20, 20) if a.quick else (1000, 100, 100)
            inputs = make_inputs(a.data, work, n_first, n_new, n_valid)
            out["inputs"] = inputs["counts"]
            ws = Workspace(str(work / "ws"))
            out["incremental"] = bench_incremental(ws, settings, inputs)
            fp = out["incremental"]["model_fp"]
            if a.only in (None, "rescore"):
                out["rescore"] = bench_rescore(ws, settings, inputs, out["incremental"]["runs"][0])
        real = None
        if a.only in (None, "scale", "storage", "layout", "scoring"):
            if ws is not None and fp is not None:
                real = real_features_from_store(ws, fp)
                out["real_features_source"] = "the incremental workspace (train + validation rows)"
            elif a.real_cache is not None and a.real_cache.exists():
                import pyarrow.parquet as pq

                real = with_mean_hidden(pq.read_table(a.real_cache))
                out["real_features_source"] = f"{a.real_cache} (cached extraction)"
            else:
                real = real_features_by_extraction(settings, a.data, 60 if a.quick else 200)
                out["real_features_source"] = "extracted for this section"
                if a.real_cache is not None:
                    import pyarrow.parquet as pq

                    a.real_cache.parent.mkdir(parents=True, exist_ok=True)
                    pq.write_table(real, a.real_cache)
        if a.only == "layout":
            out["layout"] = bench_layout(real, settings.extract.hidden_dim or 576, work=work)
        if a.only == "scoring":
            sizes = [int(s) for s in a.scoring_sizes.split(",") if s.strip()]
            out["scoring"] = bench_scoring(settings, real, sizes, work, a.max_disk_gb,
                                           recall_workspace=a.recall_workspace)
        if a.only == "storage":
            sizes = [int(s) for s in a.storage_sizes.split(",") if s.strip()]
            if a.quick:
                sizes = [max(1000, s // 10) for s in sizes]
            key_sizes = [int(s) for s in a.key_read_sizes.split(",") if s.strip()]
            if key_sizes:
                out["key_reads"] = bench_key_reads(work, key_sizes, a.read_budget_s)
            if sizes:
                out["storage"] = bench_storage(settings, real, sizes, work, a.max_disk_gb, a.read_budget_s)
        if a.only in (None, "scale"):
            sizes = [int(s) for s in a.scale_sizes.split(",") if s.strip()]
            if a.quick:
                sizes = [max(1000, s // 10) for s in sizes]
            log(f"real features: {real.num_rows} rows")
            out["scale"] = bench_scale(settings, real, sizes, work, a.quick, a.max_disk_gb, a.mem_budget_gb,
                                       a.keep)
    finally:
        out["peak_rss_mb"] = peak_rss_mb()
        out["wall_s"] = time.perf_counter() - t_start
        out["loadavg_end"] = list(os.getloadavg())
        a.out.mkdir(parents=True, exist_ok=True)
        name = "store" + ("-quick" if a.quick else "") + (f"-{a.only}" if a.only else "")
        (a.out / f"{name}.json").write_text(json.dumps(out, indent=1, default=str))
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    from tests.benchmarks.tables import print_store_tables

    print_store_tables(out)
    if "key_reads" in out:
        print_key_reads(out["key_reads"])
    if "storage" in out:
        print_storage(out["storage"])
    if "layout" in out:
        print_layout(out["layout"])
    if "scoring" in out:
        print_scoring(out["scoring"])


if __name__ == "__main__":
    main()
