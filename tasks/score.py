"""The ``score`` step: value every sample of a stored dataset against a pinned validation version from the
feature store, and write one ``scores`` run (docs/ARCHITECTURE.md §1).

The features come from the ``extract`` step (:mod:`valuegate.tasks.extract`); the math on feature matrices
is :mod:`valuegate.engine.aggregate`; the ``scores`` table is :mod:`valuegate.storage.scores`. On the
dask/ray runners the run is planned here (:func:`plan_run`) and scored in shards (:func:`score_shard`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from valuegate.engine.aggregate import (
    ChunkScores,
    ScoringContext,
    block_inner_products,
    build_context,
    score_chunk,
)
from valuegate.engine.candidates import BlockRows
from valuegate.engine.encoding import Unvalued
from valuegate.engine.faults import FaultReference, detect, pool_sample, reference_of
from valuegate.engine.progress import Progress, use_progress_interval
from valuegate.engine.score_columns import score_columns
from valuegate.engine.signals import SparseSet, check_reference_size
from valuegate.errors import ValuegateError
from valuegate.settings import Settings
from valuegate.storage import features as fstore
from valuegate.storage import samples as sstore
from valuegate.storage import schemas
from valuegate.storage.features import sparse_arrays
from valuegate.storage.scores import count_run, empty_scores, run_ids, scores_table, write_scores
from valuegate.storage.store import Store, open_store
from valuegate.storage.valsets import read_valset
from valuegate.tasks.extract import ExtractResult, check_scoring_settings, extract_for_run, shard_ids
from valuegate.tasks.validation_set import valset_samples

log = logging.getLogger(__name__)

__all__ = ["SCORE_CHUNK", "ScoreResult", "ScoreRunReport", "ScoringContext", "ScoringPlan", "load_context",
           "plan_for", "plan_run", "plan_scoring", "run", "run_rows", "score_dataset", "score_rows", "score_shard",
           "shards_to_score", "unscored_counts"]

SCORE_CHUNK = 8000  # train samples per scoring chunk (a multiple of read_features' 2,000-id queries)
STREAM_BATCH = 4096  # rows per batch of the streaming scan of the mean aggregate
STREAM_MIN_SHARE = 0.5  # stream the whole feature table when the run scores at least this share of its rows


@dataclass(frozen=True)
class ScoreResult:
    """What the ``score`` step did (:func:`run`).

    Attributes:
        run_id (str): the scores run written.
        model_fp (str): the training features' fingerprint.
        n_train (int): training samples scored.
        truncated (int): of them, valued on their first ``max_length`` tokens only.
        unscored (dict[str, int]): samples of the dataset left out, by reason
            (:data:`~valuegate.engine.encoding.REFUSAL_REASONS`).
        unscored_ids (list[Unvalued]): their ``(id, reason, message)``.
        timings (dict[str, float]): seconds per part: ``read``, ``score``, ``write``.
    """

    run_id: str
    model_fp: str
    n_train: int
    truncated: int
    unscored: dict[str, int]
    unscored_ids: list[Unvalued]
    timings: dict[str, float]


@dataclass
class ScoreRunReport:
    """What :func:`score_dataset` did."""

    run_id: str
    dataset: str
    valset: str
    model_fp: str
    n_train: int
    n_valid: int
    extract_train: object = None
    extract_valid: object = None
    timings: dict[str, float] = field(default_factory=dict)
    table: object = None
    truncated: int = 0
    unscored_ids: list[Unvalued] = field(default_factory=list)

    @property
    def unscored(self) -> dict[str, int]:
        """Samples of the dataset that reached extraction and got no score, by reason
        (:data:`~valuegate.engine.encoding.REFUSAL_REASONS`); their ids and full messages: ``unscored_ids``."""
        return unscored_counts(self.unscored_ids)

    def line(self) -> str:
        """One human line."""
        secs = " ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
        unscored = ", ".join(f"{n} {why}" for why, n in self.unscored.items())
        return (f"scores run {self.run_id}: {self.dataset} ({self.n_train} samples) against {self.valset} "
                f"({self.n_valid}) with features {self.model_fp[:12]}: {secs}"
                + (f"; {self.truncated} truncated at max_length" if self.truncated else "")
                + (f"; not scored: {unscored}" if unscored else ""))


def unscored_counts(unscored_ids: list[Unvalued]) -> dict[str, int]:
    """``{reason: count}`` of the samples left out (what every runner reports as ``unscored``)."""
    return dict(Counter(u.reason for u in unscored_ids))


def _aligned(t, ids: list[str]):
    """The rows of a feature slice in the order of ``ids`` (every id must have a row)."""
    pos = pc.index_in(pa_array(ids), value_set=t.column("id"))
    if pos.null_count:
        raise ValuegateError(f"{pos.null_count} samples have no stored features; run `valuegate extract` again")
    return t.take(pos)


def _hidden(t, n: int) -> np.ndarray:
    """``(n, d)`` float32 mean hidden states of a feature slice's ``mean_hidden`` column (stored in
    float16: float32 holds them exactly)."""
    return np.asarray(t["mean_hidden"].combine_chunks().values.to_numpy(zero_copy_only=False),
                      dtype=np.float32).reshape(n, -1)


def _feature_matrix(t, ids: list[str], vocab: int, width: int):
    """CSR ``(len(ids), V·width)`` and per-sample columns of a feature slice, in the order of ``ids``."""
    t = _aligned(t, ids)
    indptr, indices, data = sparse_arrays(t, width)
    m = sp.csr_matrix((data, indices, indptr), shape=(len(ids), vocab * width))
    return m, t


def _blocks(t, width: int) -> BlockRows:
    """The sparse rows of a feature slice as :class:`~valuegate.engine.candidates.BlockRows` (no CSR)."""
    tok = t.column("token_ids").combine_chunks()
    return BlockRows.from_arrays(pc.list_value_length(tok).fill_null(0).to_numpy(zero_copy_only=False),
                                 tok.flatten().to_numpy(zero_copy_only=False),
                                 t.column("rows").combine_chunks().flatten().to_numpy(zero_copy_only=False), width)


def pa_array(values: list[str]):
    """A pyarrow string array (kept local so the math modules never need pyarrow)."""
    return pa.array(values, type=pa.string())


@dataclass
class ScoringPlan:
    """One scores run of a stored dataset, resolved: what every scoring shard needs (picklable; its size is
    dominated by the ids).

    Attributes:
        workspace: the workspace URI. dataset: the dataset scored. valset: ``name@vN``.
        vids: the validation ids, in scoring order. ids: the training ids to score (those the model refused
            to value are left out).
        fp_t, fp_v: feature fingerprints of the training and validation sides.
        vocab, width, hidden_size: the feature set's ``V``, row width and ``d``.
        run_id: the scores run every shard writes into. settings_json: what each row records.
    """

    workspace: str
    dataset: str
    valset: str
    vids: list[str]
    ids: list[str]
    fp_t: str
    fp_v: str
    vocab: int
    width: int
    hidden_size: int
    run_id: str
    settings_json: str


def _feature_columns(settings: Settings, stored: pa.Schema | None = None) -> list[str]:
    """The feature columns a scoring chunk reads (``sketch`` too when the nearest aggregate searches
    candidates and the table ``stored`` has the column)."""
    ex, sc = settings.extract, settings.score
    cols = ["id", "truncated", "token_ids", "rows", "n_tokens", "mean_loss", "uncond_loss", "self_influence",
            "mean_hidden"]
    if sc.signals:
        cols += ["error_sum", *FAULT_FEATURES]
        if ex.hard_fraction < 1.0:
            cols += ["hard_token_ids", "hard_rows", "hard_error_sum", "hard_n_tokens", "hard_mean_loss"]
    elif sc.aggregate == "nearest" and sc.nearest_candidates > 0 and stored is not None and "sketch" in stored.names:
        cols.append("sketch")
    return cols


# the scalar feature columns the fault detectors read beside mean_loss, uncond_loss and self_influence
FAULT_FEATURES = ("max_loss", "end_loss", "prompt_overlap")


def fault_inputs(t) -> dict[str, np.ndarray]:
    """The fault detectors' per-row inputs of a feature slice (name → ``(n,)`` float64, NaN for null;
    ``hard_mean_loss`` falls back to ``mean_loss`` when no hard features were extracted)."""
    def col(name: str) -> np.ndarray:
        if name not in t.column_names:
            return np.full(t.num_rows, np.nan)
        return np.asarray(t[name].to_numpy(zero_copy_only=False), dtype=np.float64)

    out = {name: col(name) for name in ("mean_loss", "uncond_loss", "self_influence", "n_tokens", "hard_mean_loss",
                                        *FAULT_FEATURES)}
    out["hard_mean_loss"] = np.where(np.isfinite(out["hard_mean_loss"]), out["hard_mean_loss"], out["mean_loss"])
    return out


def fault_context(ws, plan: ScoringPlan, settings: Settings, vt, v_hidden: np.ndarray):
    """The fault detectors' reference (:mod:`valuegate.engine.faults`): the validation rows ``vt`` and a sample of
    ``score.fault_pool`` of the run's training rows (by id: the same pool whatever the chunking or the runner).

    Returns:
        ``(FaultReference, {training id: its position in the pool})``.
    """
    sc = settings.score
    pool = pool_sample(len(plan.ids), sc.fault_pool, plan.ids)
    pool_ids = [plan.ids[i] for i in pool]
    cols = ["id", "mean_loss", "uncond_loss", "self_influence", "n_tokens", "mean_hidden", *FAULT_FEATURES]
    if settings.extract.hard_fraction < 1.0:
        cols.append("hard_mean_loss")
    pt = _aligned(fstore.read_features(ws, plan.fp_t, pool_ids, cols), pool_ids) if pool_ids else None
    valid_in = fault_inputs(vt)
    if pt is None:
        ref = FaultReference.build(valid_in, v_hidden, list(sc.suspect), sc.suspect_neighbours,
                                   np.ones(len(v_hidden), dtype=bool))
        return ref, {}
    ref = reference_of(fault_inputs(pt), _hidden(pt, len(pool_ids)), valid_in, v_hidden, list(sc.suspect),
                       sc.suspect_neighbours, np.arange(len(pool_ids)))
    return ref, {i: n for n, i in enumerate(pool_ids)}


def _stored_schema(ws, fp: str) -> pa.Schema:
    return ws.schema(schemas.features_table(fp))


def _sketches(t, n: int, dim: int | None = None) -> np.ndarray | None:
    """``(n, D)`` float32 stored count sketches of a feature slice, or None (no column, a row without
    one, or not ``dim`` floats wide)."""
    if "sketch" not in t.column_names:
        return None
    col = t["sketch"].combine_chunks()
    if col.null_count or n == 0:
        return None
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if flat.size % n or (dim is not None and flat.size != n * dim):
        return None
    return flat.reshape(n, -1).astype(np.float32)


def plan_run(ws: Store, dataset: str, extracted: ExtractResult, settings: Settings) -> ScoringPlan:
    """Resolve the scores run of ``dataset`` on the features ``extracted`` names: the dataset's ids (less
    those the model refused), the validation ids in scoring order, the feature set's shape and a new run id.

    Raises:
        ValuegateError: settings a stored scores run cannot use (as :func:`extract_for_run`).
    """
    check_scoring_settings(settings)
    refused = {p[0] for p in extracted.refused}  # Unvalued, or a list of three read back from a cache
    ids = sstore.dataset_ids(ws, dataset)
    _, vrows = read_valset(ws, extracted.valset)
    vids, _ = valset_samples(vrows)
    if settings.score.signals:
        check_reference_size(len(vids), extracted.valset)
    fp_t, fp_v = extracted.train_fp, extracted.valid_fp
    meta = fstore.read_feature_set(ws, fp_t)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    settings_json = json.dumps({"settings": settings.model_dump(mode="json"), "train_fp": fp_t,
                                "valid_fp": fp_v}, sort_keys=True)
    return ScoringPlan(ws.uri, dataset, extracted.valset, list(vids), [i for i in ids if i not in refused], fp_t,
                       fp_v, int(meta["vocab_size"]), int(meta["row_width"]), int(meta["hidden_size"]), run_id,
                       settings_json)


def plan_for(settings: Settings, extracted: ExtractResult) -> ScoringPlan:
    """:func:`plan_run` of ``settings.data.dataset`` in ``settings.workspace``."""
    return plan_run(open_store(settings.workspace), settings.data.dataset, extracted, settings)


def plan_scoring(ws: Store, dataset: str, valset_ref: str, settings: Settings, progress: bool = True,
                 cache: dict | None = None) -> tuple[ScoringPlan, object, object, dict[str, float]]:
    """Extract what is missing (:func:`valuegate.tasks.extract.extract_for_run`), then :func:`plan_run`.

    Returns:
        ``(plan, extract report of the training side, of the validation side, timings)`` with
        ``resolve`` and ``extract`` seconds.
    """
    extracted, rep_t, rep_v = extract_for_run(ws, dataset, valset_ref, settings, progress, cache)
    return plan_run(ws, dataset, extracted, settings), rep_t, rep_v, dict(extracted.timings)


def load_context(ws, plan: ScoringPlan, settings: Settings) -> ScoringContext:
    """Read the validation side of ``plan`` from the store and build everything chunks are scored against."""
    ex, sc = settings.extract, settings.score
    vids, vocab, width = plan.vids, plan.vocab, plan.width
    cols = _feature_columns(settings, _stored_schema(ws, plan.fp_v))
    vrows = fstore.read_features(ws, plan.fp_v, vids, cols)
    # with the signals on, the rows become CSR inside SparseSet (raw and centred): no plain CSR is built
    vm, vt = (None, _aligned(vrows, vids)) if sc.signals else _feature_matrix(vrows, vids, vocab, width)
    vs = hard = None
    if sc.signals:
        vs = SparseSet.from_arrow(vt, vocab, width)
        hard = SparseSet.from_arrow(vt, vocab, width, "hard_") if ex.hard_fraction < 1.0 else None
    v_sketch = _sketches(vt, len(vids))
    if not sc.signals and sc.aggregate == "nearest" and 0 < sc.nearest_candidates < len(vids) and v_sketch is None:
        log.warning("score.nearest_candidates = %d: the stored features hold no count sketch "
                    "(extract.sketch_dim = 0), so every row is sketched while scoring, about 1.4 ms a row; set "
                    "extract.sketch_dim (e.g. 256) to store them once at extraction, or nearest_candidates = 0 "
                    "for the exact nearest (the default)", sc.nearest_candidates)
    ctx = build_context(vids, vt["self_influence"].to_numpy(), vt["n_tokens"].to_numpy().astype(np.int64),
                        _hidden(vt, len(vids)), settings, plan.hidden_size, vocab, vm=vm, valid=vs,
                        valid_hard=hard, width=width, v_sketch=v_sketch)
    if sc.signals:
        ctx.faults, ctx.fault_pool = fault_context(ws, plan, settings, vt, ctx.v_hidden)
    return ctx


def score_rows(ws, plan: ScoringPlan, ctx: ScoringContext, settings: Settings,
               ids: list[str]) -> tuple[object, float, float]:
    """Score the training samples ``ids`` of ``plan`` against the context: one row of the scores table each.

    Returns:
        ``(pyarrow table in schemas.scores_schema, seconds reading, seconds scoring)``.
    """
    ex, sc = settings.extract, settings.score
    vocab, width = plan.vocab, plan.width
    t0 = time.perf_counter()
    cols = _feature_columns(settings, _stored_schema(ws, plan.fp_t) if ctx.cand is not None else None)
    asked = ids
    trows, ids = _in_stored_order(fstore.read_features(ws, plan.fp_t, asked, cols), asked)
    ts = hard = sketch = blocks = None
    if sc.signals or ctx.cand is not None or ctx.groups is not None:
        tm, tt = None, trows
    else:
        tm, tt = _feature_matrix(trows, ids, vocab, width)
    t_read = time.perf_counter() - t0
    if sc.signals:
        ts = SparseSet.from_arrow(tt, vocab, width)
        hard = SparseSet.from_arrow(tt, vocab, width, "hard_") if ex.hard_fraction < 1.0 else None
    elif ctx.cand is not None:  # nearest by candidates: the rows as blocks, no CSR unless rows need sketching
        if ctx.cand.sketch is not None:
            sketch = _sketches(tt, len(ids), ctx.cand.sketch.shape[1])
        if ctx.cand.sketch is not None and sketch is None:
            tm, tt = _feature_matrix(tt, ids, vocab, width)
        else:
            blocks = _blocks(tt, width)
    elif ctx.groups is not None:  # the exact value matrix by token groups: the rows as blocks, no CSR
        blocks = _blocks(tt, width)
    table = _chunk_table(plan, ctx, settings, ids, tt,
                         lambda *cols: score_chunk(ctx, sc, *cols, train_csr=tm, train=ts, train_hard=hard,
                                                   t_sketch=sketch, train_blocks=blocks))
    if ids is not asked:
        table = table.take(pc.index_in(pa_array(asked), value_set=table.column("id")))
    return table, t_read, time.perf_counter() - t0 - t_read


def _in_stored_order(t, ids: list[str]) -> tuple[object, list[str]]:
    """``(feature slice, its ids)`` in the order the store returned the rows when the slice holds exactly
    ``ids``, else the slice aligned to ``ids`` (:func:`_aligned`, which names missing rows). Scoring in
    stored order and reordering the small scores table afterwards spares the reorder of the rows' list
    columns (a tenth of a ``nearest`` chunk's time at 100k rows, issue 19)."""
    got = t.column("id").to_pylist()
    if got == ids:
        return t, ids
    if len(got) == len(ids) and set(got) == set(ids):
        return t, got
    return _aligned(t, ids), ids


def _chunk_table(plan: ScoringPlan, ctx: ScoringContext, settings: Settings, ids: list[str], tt,
                 score) -> object:
    """The scores rows of the training samples ``ids`` whose per-sample feature columns are ``tt`` (in
    the order of ``ids``); ``score(t_self, t_tok, t_loss, t_hidden)`` gives their :class:`ChunkScores`."""
    sc = settings.score
    # copies: a zero-copy view would keep the whole feature batch alive in the scores table (a streamed
    # batch is one allocation: the run would hold every row it read)
    t_self = np.array(tt["self_influence"].to_numpy(), dtype=np.float64)
    t_tok = tt["n_tokens"].to_numpy().astype(np.int64)
    t_loss = tt["mean_loss"].to_numpy().astype(np.float64)
    n = len(ids)
    t_hidden = _hidden(tt, n)
    out: ChunkScores = score(t_self, t_tok, t_loss, t_hidden)
    verdict = None
    if ctx.faults is not None:
        own = np.fromiter((ctx.fault_pool.get(i, -1) for i in ids), dtype=np.int64, count=n)
        verdict = detect(ctx.faults, fault_inputs(tt), t_hidden, own)
    cols = score_columns(out, t_tok, tt["truncated"].fill_null(False).to_numpy(zero_copy_only=False).copy(), t_loss,
                         tt["uncond_loss"].to_pylist(), t_hidden, ctx.v_hidden, verdict, self_influence=t_self)
    near, near_values = cols.pop("nearest"), cols.pop("nearest_values")
    now = dt.datetime.now(dt.timezone.utc)
    none = [None] * n
    rows = {
        "run_id": [plan.run_id] * n, "dataset": [plan.dataset] * n, "id": ids, "value": cols.pop("value"),
        "aggregate": [sc.aggregate] * n, "normalize": [sc.normalize] * n,
        "nearest_ids": [list(ctx.vids[r]) for r in near] if near is not None else none,
        "nearest_values": [list(r) for r in near_values] if near_values is not None else none,
        **cols,
        "valset": [plan.valset] * n, "model_fp": [plan.fp_t] * n, "settings": [plan.settings_json] * n,
        "at": [now] * n,
    }
    return scores_table(rows)


def streams_mean(ws, plan: ScoringPlan, settings: Settings) -> bool:
    """Whether :func:`score_dataset` scores the run by one streaming scan of the training feature table
    (:func:`score_streaming`): signals off, ``mean`` aggregate, and the run's samples at least
    :data:`STREAM_MIN_SHARE` of the table's rows (a scan reads them all; reads by id only the run's)."""
    sc = settings.score
    if sc.signals or sc.aggregate != "mean" or not plan.ids:
        return False
    return len(plan.ids) >= STREAM_MIN_SHARE * ws.count(schemas.features_table(plan.fp_t))


def score_streaming(ws, plan: ScoringPlan, ctx: ScoringContext, settings: Settings,
                    batch_rows: int = STREAM_BATCH, bar: Progress | None = None) -> tuple[object, float]:
    """Score every sample of ``plan`` (signals off, ``mean``) in one streaming scan of the training
    feature table: per batch the inner product of each row with the context's weighted validation
    vector, from the stored int8 steps (:func:`~valuegate.engine.aggregate.block_inner_products`), and the
    rows of the scores table; rows of samples the run does not score (other datasets) are skipped. Peak
    memory is bounded by ``batch_rows``, not by the table; the values equal the chunked path's
    (:func:`score_rows`) up to summation order.

    Returns:
        ``(pyarrow table in the order of plan.ids, seconds)``.

    Raises:
        ValuegateError: some sample of the run has no stored features.
    """
    t0 = time.perf_counter()
    sc = settings.score
    want = {i: n for n, i in enumerate(plan.ids)}
    cols = ["id", "truncated", "token_ids", "rows", "n_tokens", "mean_loss", "uncond_loss", "self_influence",
            "mean_hidden"]
    tables, order = [], []
    for batch in fstore.iter_features(ws, plan.fp_t, cols, batch_rows, steps=True):
        pos = np.fromiter((want.get(i, -1) for i in batch.column(0).to_pylist()), dtype=np.int64,
                          count=batch.num_rows)
        keep = pos >= 0
        if not keep.any():
            continue
        tt = pa.Table.from_batches([batch])
        if not keep.all():
            tt = tt.filter(pa.array(keep))
        tok_col = tt["token_ids"].combine_chunks()
        tok = tok_col.flatten().to_numpy(zero_copy_only=False)
        _, steps = fstore.row_steps(tt["rows"])
        scales = tt["rows_scale"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(tok_col).fill_null(0).to_numpy(zero_copy_only=False)
        raw = block_inner_products(tok, steps, lengths, ctx.v_mean, scales)
        ids = tt["id"].to_pylist()
        tables.append(_chunk_table(plan, ctx, settings, ids, tt,
                                   lambda *cols, raw=raw: score_chunk(ctx, sc, *cols, t_mean_raw=raw)))
        order.append(pos[keep])
        if bar is not None:
            bar.update(int(keep.sum()))
    got = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    if got.size != len(plan.ids):
        raise ValuegateError(f"{len(plan.ids) - np.unique(got).size} samples have no stored features; run "
                             "`valuegate extract` again")
    table = pa.concat_tables(tables)
    inv = np.empty(got.size, dtype=np.int64)
    inv[got] = np.arange(got.size)
    return table.take(pa.array(inv)), time.perf_counter() - t0


def score_dataset(ws: Store, dataset: str, valset_ref: str, settings: Settings, progress: bool = True,
                  write: bool = True, extracted: ExtractResult | None = None) -> ScoreRunReport:
    """Score every sample of a stored dataset against ``name@vN`` and write one ``scores`` run.

    Features come from the store; only samples without features for the fingerprint are run through the
    model (so a new validation version costs the extraction of the validation samples alone), unless
    ``extracted`` says the ``extract`` step did that already (then no model is loaded here). Training
    features stream in chunks of :data:`SCORE_CHUNK`: memory holds one chunk's sparse rows (float64 while
    multiplied), never the whole dataset's.
    """
    use_progress_interval(settings.progress_seconds)
    if extracted is None:
        plan, rep_t, rep_v, timings = plan_scoring(ws, dataset, valset_ref, settings, progress)
        unscored_ids = list(rep_t.refused or [])
    else:
        plan, rep_t, rep_v, timings = plan_run(ws, dataset, extracted, settings), None, None, {}
        unscored_ids = [Unvalued(*p) for p in extracted.refused]
    t0 = time.perf_counter()
    ctx = load_context(ws, plan, settings)
    timings["read"] = time.perf_counter() - t0
    timings["score"] = 0.0
    tables = []
    bar = Progress(len(plan.ids), "score", bar=progress)
    if streams_mean(ws, plan, settings):
        table, timings["score"] = score_streaming(ws, plan, ctx, settings, bar=bar)  # the reads included (one scan)
        tables.append(table)
    else:
        for lo in range(0, len(plan.ids), SCORE_CHUNK):
            table, t_read, t_score = score_rows(ws, plan, ctx, settings, plan.ids[lo:lo + SCORE_CHUNK])
            tables.append(table)
            timings["read"] += t_read
            timings["score"] += t_score
            bar.update(table.num_rows)
    bar.close()
    table = pa.concat_tables(tables) if tables else empty_scores()
    if write:
        t0 = time.perf_counter()
        write_scores(ws, table)
        timings["write"] = time.perf_counter() - t0
    return ScoreRunReport(plan.run_id, dataset, plan.valset, plan.fp_t, len(plan.ids), len(plan.vids), rep_t,
                          rep_v, timings, table, int(pc.sum(table["truncated"]).as_py() or 0), unscored_ids)


def run(settings: Settings, extracted: ExtractResult) -> tuple[ScoreResult, str]:
    """The ``score`` step of the refresh DAG: :func:`score_dataset` of ``settings.data.dataset`` on the
    features the ``extract`` step stored (no model is loaded).

    Returns:
        the result and the run's one human line (for the log).
    """
    rep = score_dataset(open_store(settings.workspace), settings.data.dataset, extracted.valset,
                        settings, progress=False, extracted=extracted)
    return ScoreResult(rep.run_id, rep.model_fp, rep.n_train, rep.truncated, rep.unscored,
                       list(rep.unscored_ids), dict(rep.timings)), rep.line()


# one scoring context per worker process: the validation side of the run its shards belong to
_CONTEXT: dict[str, object] = {}


def score_shard(plan: ScoringPlan, ids: list[str], settings: Settings) -> dict[str, object]:
    """Score one shard of a run on whichever process runs it and write its rows into the run
    (:func:`write_scores`: a retried shard whose rows were committed keeps them, never duplicates them).

    The validation side is read once per process and run (``context_loads`` counts the reads).

    Returns:
        ``scored`` rows, ``pid``, ``context_loads`` (this process, so far) and ``read``/``score``/``write``
        seconds.
    """

    ws = open_store(plan.workspace)
    if _CONTEXT.get("run_id") != plan.run_id:
        t0 = time.perf_counter()
        _CONTEXT.update(run_id=plan.run_id, ctx=load_context(ws, plan, settings),
                        loads=int(_CONTEXT.get("loads", 0)) + 1, read=time.perf_counter() - t0)
    else:
        _CONTEXT["read"] = 0.0
    table, t_read, t_score = score_rows(ws, plan, _CONTEXT["ctx"], settings, ids)
    t0 = time.perf_counter()
    write_scores(ws, table)
    return {"scored": table.num_rows, "pid": os.getpid(), "context_loads": _CONTEXT["loads"],
            "read": float(_CONTEXT["read"]) + t_read, "score": t_score, "write": time.perf_counter() - t0}


def shards_to_score(settings: Settings, plan: dict[str, Any]) -> tuple[list[list[str]], list[tuple[int, list[str]]]]:
    """The shards of ``plan`` (a :class:`ScoringPlan` as a dict) in ``settings.runner.shard_size``, and
    those still to score ``(k, ids)``: a shard whose every row the run already holds (a resumed run) is
    not scored again."""
    done = run_ids(open_store(settings.workspace), plan["run_id"])
    shards = shard_ids(plan["ids"], settings.runner.shard_size)
    return shards, [(k, ids) for k, ids in enumerate(shards) if not done.issuperset(ids)]


def run_rows(settings: Settings, run_id: str) -> tuple[int, int]:
    """``(rows, truncated rows)`` scores run ``run_id`` holds."""
    ws = open_store(settings.workspace)
    return count_run(ws, run_id), count_run(ws, run_id, truncated=True)
