"""The ``extract`` step: forward-only features of a dataset's samples into the feature store.

Only missing ids are extracted, in numbered batches, one commit per batch; the model side (batches,
token blocks, sparse features) is ``valuegate/engine/extraction.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from valuegate.engine.baselines import unconditional_losses
from valuegate.engine.columns import FEATURE_FORMAT
from valuegate.engine.encoding import TOO_LONG, Refusal, Unvalued
from valuegate.engine.extraction import (
    ExtractionStats,
    block_features,
    iter_sample_blocks,
    projections,
    stored_features,
)
from valuegate.engine.forvalue import SparseFeatures
from valuegate.engine.model import (
    LoadedModel,
    fingerprint_settings,
    load_model,
    load_tokenizer,
    model_fingerprint,
)
from valuegate.engine.progress import Progress, use_progress_interval
from valuegate.engine.sample import Sample
from valuegate.engine.signals import check_reference_size
from valuegate.errors import ValuegateError
from valuegate.inputs.identity import sample_from_record
from valuegate.settings import ExtractSettings, ModelSettings, Settings, needs_unconditional
from valuegate.storage import features as fstore
from valuegate.storage import samples as sstore
from valuegate.storage.images import attach_image_data
from valuegate.storage.store import Store, open_store
from valuegate.storage.valsets import read_valset
from valuegate.tasks.validation_set import valset_samples

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Extraction into the feature store: only missing ids, numbered batches, one commit per batch.
# --------------------------------------------------------------------------------------------------


@dataclass
class StoreExtractReport:
    """What :func:`extract_to_store` did."""

    model_fp: str
    requested: int = 0
    already: int = 0
    extracted: int = 0
    refused: list[Unvalued] | None = None  # samples the model cannot value
    truncated: int = 0  # extracted here from a sample cut at max_length (stored with truncated = true)
    older_format: int | None = None  # these settings' features are stored in this older format (not read)
    batches: int = 0
    stats: ExtractionStats | None = None
    uncond_seconds: float = 0.0  # the unconditional pass (IFD) over the extracted samples
    unconditional: bool = True  # whether the unconditional pass ran (extract.unconditional, resolved)

    def line(self) -> str:
        """One human line."""
        s = self.stats or ExtractionStats()
        rate = f", {s.samples / s.seconds:.1f} samples/s" if s.seconds else ""
        return (f"features {self.model_fp[:12]}: {self.requested} ids, {self.already} already extracted, "
                f"{self.extracted} extracted in {self.batches} batches{rate}"
                + (f", {self.truncated} truncated at max_length" if self.truncated else "")
                + (f", {len(self.refused)} refused" if self.refused else "")
                + (f"; re-extracted: the stored format {self.older_format} is older than {FEATURE_FORMAT}"
                   if self.older_format is not None else ""))


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def feature_row(sample_id: str, f: SparseFeatures, batch: int, seconds: float, truncated: bool = False,
                uncond_loss: float | None = None) -> dict:
    """A :class:`SparseFeatures` as a row of a ``features__<fp>`` table (``truncated``: the sample was cut at
    ``max_length``; ``uncond_loss``: mean loss of its response alone, None or NaN when it has none).

    ``f`` in the stored form (:func:`~valuegate.engine.extraction.stored_features`: rows rounded to int8
    steps with their scales, their self-influence and sketch); other rows are rounded by the store's
    writer, without a sketch."""
    uncond = None if uncond_loss is None or not np.isfinite(uncond_loss) else float(uncond_loss)
    return {"id": sample_id, "truncated": truncated, "token_ids": f.token_ids, "rows": f.rows.reshape(-1),
            "rows_scale": f.rows_scale, "n_tokens": f.n_tokens,
            "mean_loss": f.mean_loss, "uncond_loss": uncond, "max_loss": _finite_or_none(f.max_loss),
            "end_loss": _finite_or_none(f.end_loss), "prompt_overlap": _finite_or_none(f.prompt_overlap),
            "dropped_mass": f.dropped_mass, "self_influence": f.self_influence,
            "mean_hidden": f.mean_hidden,
            "pooled_error": f.pooled_error if f.pooled_error.size else np.zeros(1, np.float32),
            "error_sum": f.error_sum,
            "hard_token_ids": None if f.hard is None else f.hard.token_ids,
            "hard_rows": None if f.hard is None else f.hard.rows.reshape(-1),
            "hard_rows_scale": None if f.hard is None else f.hard.rows_scale,
            "hard_error_sum": None if f.hard is None else f.hard.error_sum,
            "hard_n_tokens": None if f.hard is None else f.hard.n_tokens,
            "hard_mean_loss": None if f.hard is None else f.hard.mean_loss,
            "batch": batch, "seconds": seconds, "sketch": f.sketch}


def extract_to_store(ws, lm_loader, ids: list[str], samples: list[Sample], cfg: ExtractSettings,
                     model_fp: str, fp_settings: dict, lowest_likelihood_ratio: float = 1.0,
                     write_every: int = 256, progress: bool = True, desc: str = "extract",
                     commit_seconds: float = 60.0) -> StoreExtractReport:
    """Extract features for the ``ids`` that have none for ``model_fp`` and write them as they come.

    Args:
        ws: the workspace.
        lm_loader: ``() -> LoadedModel``, called only when something is missing (so a run with nothing to
            do never loads the weights).
        ids, samples: the samples to cover (same order).
        cfg: extraction settings. model_fp, fp_settings: the fingerprint and what it covers.
        lowest_likelihood_ratio: for training sets; validation sets use 1.
        write_every: samples per committed batch (at most; a batch is also committed once
            ``commit_seconds`` have passed since the last commit, so a crash loses little).

    The unconditional pass (IFD's response alone) runs when ``fp_settings["unconditional"]`` is true (the
    resolved ``extract.unconditional``; absent: true); otherwise every row's ``uncond_loss`` is null.
    """
    unconditional = bool(fp_settings.get("unconditional", True))
    report = StoreExtractReport(model_fp, requested=len(set(ids)), refused=[], stats=ExtractionStats(),
                                unconditional=unconditional)
    have = fstore.feature_ids(ws, model_fp)
    todo: dict[str, Sample] = {}
    for sid, s in zip(ids, samples, strict=True):
        if sid not in have:
            todo.setdefault(sid, s)
    report.already = report.requested - len(todo)
    if cfg.truncation == "refuse":  # stored earlier under "truncate": their features are of a cut sample
        report.refused.extend(refused_truncated(ws, model_fp, [i for i in dict.fromkeys(ids) if i not in todo],
                                                cfg.max_length))
    if not todo:
        return report
    lm = lm_loader()
    if fstore.read_feature_set(ws, model_fp) is None:  # a new fingerprint: maybe only the format is new
        report.older_format = say_older_format(ws, model_fp, fp_settings, len(todo))
    if any(s.images for s in todo.values()):  # image-text samples read back from the store: their bytes
        todo = dict(zip(todo, attach_image_data(ws, list(todo.values())), strict=True))
    width = cfg.hidden_dim or lm.hidden_size
    fstore.ensure_feature_set(ws, model_fp, fp_settings, lm.hidden_size, lm.vocab_size, width, cfg.error_dim,
                              cfg.sketch_dim)
    todo_ids, todo_samples = list(todo), list(todo.values())
    refused: list[tuple[int, Refusal]] = []
    cut: set[int] = set()
    ph, pe = projections(cfg, lm.hidden_size, lm.vocab_size)
    ph = ph.to(lm.device) if ph is not None else None
    pe = pe.to(lm.device) if pe is not None else None
    # IFD's pass of the responses alone runs ahead of the main pass, window by window of its batches: each row
    # is written once, whole, and rows are committed as they come (not after a pass over every sample)
    ahead = UnconditionalAhead(lm, todo_samples, cfg, commit_seconds / 2, progress, f"{desc} (IFD)") \
        if unconditional and not lm.is_vision else None
    uncond = ahead.losses if ahead is not None else np.full(len(todo_samples), np.nan)
    batch_no = time.time_ns() // 1000  # unique per run; rows carry the batch they were committed in
    buffer: list[dict] = []
    t_last = t_commit = time.perf_counter()
    for idx, block in iter_sample_blocks(lm, todo_samples, cfg, 1.0, progress, desc, report.stats, refused,
                                         truncated=cut, before=ahead.before if ahead is not None else None):
        feats = stored_features(block_features(block, cfg, ph, pe, lowest_likelihood_ratio), cfg,
                                [f"sample {todo_ids[i][:12]}" for i in idx])
        now = time.perf_counter()
        share = (now - t_last) / max(1, len(idx))
        t_last = now
        buffer.extend(feature_row(todo_ids[i], f, batch_no + report.batches, share, i in cut, uncond[i])
                      for i, f in zip(idx, feats, strict=True))
        if len(buffer) >= write_every or now - t_commit >= commit_seconds:
            fstore.write_features(ws, model_fp, buffer, lm.hidden_size, cfg.error_dim, cfg.sketch_dim)
            report.extracted += len(buffer)
            report.batches += 1
            buffer = []
            t_commit = time.perf_counter()
    if buffer:
        fstore.write_features(ws, model_fp, buffer, lm.hidden_size, cfg.error_dim, cfg.sketch_dim)
        report.extracted += len(buffer)
        report.batches += 1
    if ahead is not None:
        ahead.close()
        report.uncond_seconds = ahead.seconds
    report.refused.extend(Unvalued(todo_ids[i], why.reason, str(why)) for i, why in refused)
    report.truncated = len(cut)
    return report


class UnconditionalAhead:
    """IFD's unconditional pass run ahead of the main pass of :func:`extract_to_store`, a window of the main
    pass's batches at a time (its ``before`` hook): before batch ``k`` runs, the responses of every sample of
    batches ``k`` .. ``m`` have their loss in :attr:`losses`.

    A window's samples have similar lengths (the main batches are length-sorted), so their responses batch with
    little padding (sorted again by their own length, in batches of ``batch_size`` × the window's longest
    response in tokens: :func:`~valuegate.engine.baselines.unconditional_losses`). The window
    grows while the pass over it takes under ``budget_s`` seconds (so rows are still committed about every
    ``2 × budget_s``), from 4 batches up to 256: on a fast device the windows become large, the batches of
    the pass nearly those of a pass sorted over every sample.

    Attributes:
        losses: ``(n,)`` float64, NaN until computed (and where undefined).
        seconds: time spent in the pass.
    """

    MIN_BATCHES, MAX_BATCHES = 4, 256

    def __init__(self, lm: LoadedModel, samples: list[Sample], cfg: ExtractSettings, budget_s: float,
                 progress: bool, desc: str) -> None:
        self.lm, self.samples, self.cfg, self.budget_s = lm, samples, cfg, budget_s
        self.losses = np.full(len(samples), np.nan)
        self.bar = Progress(len(samples), desc, bar=progress)
        self.done_upto = 0  # batches of the main plan whose samples have their loss
        self.window = self.MIN_BATCHES
        self.seconds = 0.0

    def before(self, plan: list[list[int]], k: int) -> None:
        """The main pass's hook: run the pass over the next window when batch ``k`` is not covered yet."""
        if k < self.done_upto:
            return
        hi = min(len(plan), k + self.window)
        idx = [i for b in plan[k:hi] for i in b]
        t0 = time.perf_counter()
        self.losses[idx] = unconditional_losses(self.lm, [self.samples[i] for i in idx], self.cfg, bar=self.bar)
        took = time.perf_counter() - t0
        self.seconds += took
        self.done_upto = hi
        if took < self.budget_s / 2:
            self.window = min(self.MAX_BATCHES, self.window * 2)
        elif took > self.budget_s:
            self.window = max(self.MIN_BATCHES, self.window // 2)

    def close(self) -> None:
        """End the pass's progress."""
        self.bar.close()


def say_older_format(ws, model_fp: str, fp_settings: dict, n: int) -> int | None:
    """Log (one warning) when the features of ``fp_settings`` are stored in an older feature format only, so
    the ``n`` samples about to be extracted under the new fingerprint ``model_fp`` are extracted again.

    Returns:
        That older format, or None.
    """
    old = fstore.older_format(ws, fp_settings)
    if old is not None:
        log.warning(f"features {model_fp[:12]}: stored under an older feature format {old} (the current "
                    f"format is {FEATURE_FORMAT}), which is not read; extracting {n} samples again")
    return old


def dataset_samples(ws: Store, dataset: str, ids: list[str]) -> dict[str, Sample]:
    """``{id: Sample}`` of the stored ``ids``, each named by the first file row of ``dataset`` that holds it
    (what a refusal of the sample says: file, row, field), else as ``store: row 0``."""
    if not ids:
        return {}
    where = sstore.first_rows(ws, dataset, ids)
    return {r["id"]: sample_from_record(r, row, source) for r in sstore.read_samples_by_id(ws, ids).to_pylist()
            for source, row in [where.get(r["id"], ("store", 0))]}


def refused_truncated(ws, model_fp: str, ids: list[str], max_length: int) -> list[Unvalued]:
    """The ``ids`` whose stored features are of a sample cut at ``max_length`` (extracted under ``truncation
    = "truncate"``): what ``"refuse"`` refuses without running the model again."""
    return [Unvalued(i, TOO_LONG, f"sample {i[:12]}: {TOO_LONG}={max_length} (extract.truncation = refuse)")
            for i in fstore.truncated_ids(ws, model_fp, ids)]


def cached_model(cache: dict, model_cfg: ModelSettings, tokenizer: object, progress: bool) -> Callable[[], LoadedModel]:
    """``() -> LoadedModel``: the model of ``model_cfg``, loaded on the first call and kept in ``cache``
    under ``"lm"`` (shared by the training and the validation side of one run; a sharded run's workers
    use the process-wide :func:`worker_model` instead)."""

    def loader() -> LoadedModel:
        if "lm" not in cache:
            cache["lm"] = load_model(model_cfg, tokenizer, progress)
        return cache["lm"]

    return loader


def feature_fingerprint(settings: Settings, tokenizer: object, ratio: float) -> tuple[dict, str]:
    """The fingerprint settings and hash features of ``settings`` are stored under: those of the model and
    extraction (:func:`~valuegate.engine.model.fingerprint_settings`) and, when IFD's pass of the responses
    alone does not run (:func:`~valuegate.settings.needs_unconditional`), ``"unconditional": False``: a
    table holds every ``uncond_loss`` it can, or none. Absent, the pass runs, as it always did before
    ``extract.unconditional``: features stored by an earlier valuegate keep their fingerprint."""
    fps = fingerprint_settings(settings.model, settings.extract, tokenizer, ratio)
    if not needs_unconditional(settings):
        fps["unconditional"] = False
    return fps, model_fingerprint(fps)


def dataset_fingerprint(ws, dataset: str, settings, tokenizer: object,
                        ratio: float) -> tuple[list[str], dict, str]:
    """A dataset's ids and the fingerprint (settings, hash) its training features are stored under.

    Raises:
        ValuegateError: the dataset has no samples.
    """
    ids = sstore.dataset_ids(ws, dataset)
    if not ids:
        raise ValuegateError(f"dataset {dataset!r} has no samples in {ws.uri}; run `valuegate ingest {dataset} FILE`")
    fps, fp = feature_fingerprint(settings, tokenizer, ratio)
    return ids, fps, fp


def extract_dataset(ws, dataset: str, settings, progress: bool = True, lm_cache: dict | None = None,
                    tokenizer: object | None = None, lowest_likelihood_ratio: float | None = None
                    ) -> StoreExtractReport:
    """``valuegate extract``: features for every sample of a stored dataset that has none for the
    fingerprint of ``settings`` (the model loads only when something is missing).

    Args:
        ws: the workspace. dataset: its name. settings: the resolved :class:`Settings`.
        progress: progress bar on stderr.
        lm_cache: a dict in which the loaded model is kept under ``"lm"`` (shared with a later step).
        tokenizer: the model's tokenizer when already loaded.
        lowest_likelihood_ratio: overrides ``settings.extract.lowest_likelihood_ratio`` (validation: 1).

    Raises:
        ValuegateError: the dataset has no samples.
    """
    use_progress_interval(settings.progress_seconds)
    ex = settings.extract
    ratio = ex.lowest_likelihood_ratio if lowest_likelihood_ratio is None else lowest_likelihood_ratio
    tok = tokenizer if tokenizer is not None else load_tokenizer(settings.model)
    ids, fps, fp = dataset_fingerprint(ws, dataset, settings, tok, ratio)
    loader = cached_model(lm_cache if lm_cache is not None else {}, settings.model, tok, progress)
    have = fstore.feature_ids(ws, fp)
    missing = [i for i in ids if i not in have]
    recs = dataset_samples(ws, dataset, missing)
    rep = extract_to_store(ws, loader, missing, [recs[i] for i in missing], ex, fp, fps, ratio,
                           progress=progress, desc="train")
    rep.requested, rep.already = len(ids), len(ids) - len(missing)
    if ex.truncation == "refuse":
        rep.refused = [*refused_truncated(ws, fp, [i for i in ids if i in have], ex.max_length),
                       *(rep.refused or [])]
    return rep


# --------------------------------------------------------------------------------------------------
# Sharded extraction (the dask/ray runners): deterministic shards of the missing ids, one call per shard
# on a worker that keeps its model loaded across the shards it runs. Nothing here knows which runner
# (if any) calls it.
# --------------------------------------------------------------------------------------------------

# The worker-level model cache: one loaded model per model fingerprint and process, shared by every shard
# the process runs (a Dask or Ray worker process loads the weights once, not once per task).
_WORKER_MODELS: dict[str, LoadedModel] = {}
_WORKER_LOADS: dict[str, int] = {}  # loads per fingerprint in this process (what the cache saved is visible)
_WORKER_LOCK = threading.Lock()


def worker_model(model_fp: str, model_cfg, tokenizer: object | None = None) -> LoadedModel:
    """The model of ``model_fp`` for this process: loaded on first use, then reused (thread-safe)."""
    with _WORKER_LOCK:
        lm = _WORKER_MODELS.get(model_fp)
        if lm is None:
            lm = load_model(model_cfg, tokenizer, progress=False)
            _WORKER_MODELS[model_fp] = lm
            _WORKER_LOADS[model_fp] = _WORKER_LOADS.get(model_fp, 0) + 1
        return lm


def shard_ids(ids: list[str], shard_size: int) -> list[list[str]]:
    """Cut ``ids`` into shards of at most ``shard_size``: distinct ids ordered by (sha256 of the id, id),
    then consecutive runs. Deterministic: the same ids always give the same shards, whatever their order."""
    if shard_size < 1:
        raise ValuegateError(f"shard size must be at least 1, got {shard_size}")
    ordered = sorted(set(ids), key=lambda i: (hashlib.sha256(i.encode()).hexdigest(), i))
    return [ordered[lo:lo + shard_size] for lo in range(0, len(ordered), shard_size)]


@dataclass
class ShardPlan:
    """What :func:`plan_extract_shards` found: the training fingerprint and the shards still to extract."""

    model_fp: str
    fp_settings: dict
    lowest_likelihood_ratio: float
    n_ids: int
    n_missing: int
    shards: list[list[str]]


def plan_extract_shards(ws, dataset: str, settings, shard_size: int) -> ShardPlan:
    """The dataset's ids without training features for the fingerprint of ``settings``, as shards.

    Also registers the fingerprint's feature set (once, before any shard runs, so concurrent shards never
    race to register it); that loads the model in this process only the first time a fingerprint is seen.

    Raises:
        ValuegateError: the dataset has no samples.
    """
    ex = settings.extract
    tok = load_tokenizer(settings.model)
    ids, fps, fp = dataset_fingerprint(ws, dataset, settings, tok, ex.lowest_likelihood_ratio)
    have = fstore.feature_ids(ws, fp)
    missing = [i for i in ids if i not in have]
    if missing and fstore.read_feature_set(ws, fp) is None:
        say_older_format(ws, fp, fps, len(missing))
        lm = worker_model(fp, settings.model, tok)
        fstore.ensure_feature_set(ws, fp, fps, lm.hidden_size, lm.vocab_size, ex.hidden_dim or lm.hidden_size,
                                  ex.error_dim, ex.sketch_dim)
    return ShardPlan(fp, fps, ex.lowest_likelihood_ratio, len(ids), len(missing), shard_ids(missing, shard_size))


def extract_shard(workspace: str, ids: list[str], settings, model_fp: str, fp_settings: dict,
                  lowest_likelihood_ratio: float) -> dict:
    """Extract and write the training features of one shard (the ids that still have none).

    Runs on any worker that reaches the workspace: reads the shard's samples from the store, takes the
    model from the worker-level cache (:func:`worker_model`), and writes through :func:`extract_to_store`
    (batches committed as they come; a retried shard extracts only what the failed attempt did not commit).
    The vector index is left to the caller (once, after every shard).

    Returns:
        ``extracted``, ``already``, ``refused`` (ids), ``batches``, ``seconds`` (forward passes), ``pid``
        and ``model_loads`` (loads of this fingerprint so far in the worker process).
    """
    use_progress_interval(settings.progress_seconds)
    ws = open_store(workspace)
    recs = dataset_samples(ws, settings.data.dataset, list(ids))
    lost = [i for i in ids if i not in recs]
    if lost:
        raise ValuegateError(f"shard: {len(lost)} ids are not in the samples table of {ws.uri} (e.g. {lost[0]})")
    rep = extract_to_store(ws, lambda: worker_model(model_fp, settings.model), list(ids),
                           [recs[i] for i in ids], settings.extract, model_fp, fp_settings, lowest_likelihood_ratio,
                           progress=False, desc="shard")
    stats = rep.stats or ExtractionStats()
    return {"extracted": rep.extracted, "already": rep.already, "refused": [u.id for u in rep.refused or []],
            "batches": rep.batches, "seconds": round(stats.seconds, 3), "pid": os.getpid(),
            "model_loads": _WORKER_LOADS.get(model_fp, 0)}


# --------------------------------------------------------------------------------------------------
# The ``extract`` step of the refresh DAG: the training and validation features a scores run reads.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractResult:
    """What the ``extract`` step did (:func:`run`, :func:`extract_for_run`); plain JSON once
    ``dataclasses.asdict``-ed (a cached step's result).

    Attributes:
        valset (str): the pinned validation version, ``name@vN``.
        train_fp (str): fingerprint of the training features (the dataset's samples).
        valid_fp (str): fingerprint of the validation features.
        n_train (int): samples of the dataset.
        extracted (int): training samples extracted by this call (0: all were stored already).
        extracted_valid (int): validation samples extracted by this call.
        refused (list[Unvalued]): ``(id, reason, message)`` of training samples the model cannot value (left
            out of the scores run).
        timings (dict[str, float]): seconds: ``resolve`` (ids, validation version, fingerprints) and
            ``extract`` (the forward passes and writes).
        unconditional (bool): whether features carry IFD's unconditional loss (``extract.unconditional``
            resolved, :func:`~valuegate.settings.needs_unconditional`).
    """

    valset: str
    train_fp: str
    valid_fp: str
    n_train: int
    extracted: int
    extracted_valid: int
    refused: list[Unvalued]
    timings: dict[str, float]
    unconditional: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractResult:
        """The result of ``dataclasses.asdict`` (e.g. read back from the step's cache), rebuilt."""
        return cls(**{**d, "refused": [Unvalued(*p) for p in d["refused"]]})

    def line(self) -> str:
        """One human line."""
        return (f"features {self.train_fp[:12]} of {self.n_train} samples ({self.extracted} extracted"
                + (f", {len(self.refused)} refused" if self.refused else "")
                + f"), validation {self.valset} {self.valid_fp[:12]} ({self.extracted_valid} extracted)"
                + ("" if self.unconditional else "; no IFD pass (extract.unconditional)"))


def check_scoring_settings(settings: Settings) -> None:
    """Raise when ``settings.score`` asks for what a stored scores run cannot hold.

    Raises:
        ValuegateError: ``method`` is not ``sparse`` (the store keeps sparse features) or the aggregate is
            ``pairwise`` (a run holds one value per sample).
    """
    sc = settings.score
    if sc.method != "sparse":
        raise ValuegateError("score-set scores from the feature store, which keeps sparse features; "
                             "use `valuegate score --method exact` on files for the exact oracle")
    if sc.aggregate == "pairwise":
        raise ValuegateError("score-set writes one value per sample: use --aggregate mean or nearest "
                             "(`valuegate score` gives the pairwise matrix)")


def extract_for_run(ws: Store, dataset: str, valset_ref: str, settings: Settings, progress: bool = True,
                    cache: dict | None = None) -> tuple[ExtractResult, StoreExtractReport, StoreExtractReport]:
    """Resolve what a scores run of ``dataset`` against ``valset_ref`` reads (the dataset's ids, the pinned
    validation version, both fingerprints) and extract the features still missing (training samples here
    only when a runner did not extract them already).

    Returns:
        the result, and the extraction reports of the training and the validation side.

    Raises:
        ValuegateError: settings a stored run cannot use (:func:`check_scoring_settings`), an empty dataset,
            a validation set too small for the signals, a validation sample the model cannot value.
    """
    use_progress_interval(settings.progress_seconds)
    ex, sc = settings.extract, settings.score
    check_scoring_settings(settings)
    t0 = time.perf_counter()
    ids = sstore.dataset_ids(ws, dataset)
    if not ids:
        raise ValuegateError(f"dataset {dataset!r} has no samples in {ws.uri}; run `valuegate ingest {dataset} FILE`")
    record, vrows = read_valset(ws, valset_ref)
    valset = f"{record['name']}@v{record['version']}"
    vids, vsamples = valset_samples(vrows)
    if sc.signals:
        check_reference_size(len(vids), valset)
    tok = load_tokenizer(settings.model)
    fp_t_settings, fp_t = feature_fingerprint(settings, tok, ex.lowest_likelihood_ratio)
    fp_v_settings, fp_v = feature_fingerprint(settings, tok, 1.0)
    cache = {} if cache is None else cache
    timings = {"resolve": time.perf_counter() - t0}
    t0 = time.perf_counter()
    rep_t = extract_dataset(ws, dataset, settings, progress, cache, tok)
    rep_v = extract_to_store(ws, cached_model(cache, settings.model, tok, progress), vids, vsamples, ex, fp_v,
                             fp_v_settings, 1.0, progress=progress, desc="validation")
    if rep_v.refused:
        raise ValuegateError(f"{valset}: a validation sample cannot be valued: {rep_v.refused[0].message}")
    timings["extract"] = time.perf_counter() - t0
    result = ExtractResult(valset, fp_t, fp_v, len(ids), rep_t.extracted, rep_v.extracted,
                           list(rep_t.refused or []), timings,
                           bool(fp_t_settings.get("unconditional", True)))
    return result, rep_t, rep_v


def run(settings: Settings, valset_ref: str) -> ExtractResult:
    """The ``extract`` step of the refresh DAG: :func:`extract_for_run` of ``settings.data.dataset`` in
    ``settings.workspace`` (no progress bar)."""
    return extract_for_run(open_store(settings.workspace), settings.data.dataset, valset_ref, settings,
                           progress=False)[0]


# --------------------------------------------------------------------------------------------------
# What the flow's sharded path (dask/ray) asks of the store, by settings
# --------------------------------------------------------------------------------------------------


def shard_plan(settings: Settings) -> ShardPlan:
    """:func:`plan_extract_shards` of ``settings.data.dataset`` in shards of ``settings.runner.shard_size``."""
    return plan_extract_shards(open_store(settings.workspace), settings.data.dataset, settings,
                               settings.runner.shard_size)


def stored_count(settings: Settings, model_fp: str, ids: set[str]) -> int:
    """How many of ``ids`` have features stored for ``model_fp``."""
    return len(ids & fstore.feature_ids(open_store(settings.workspace), model_fp))
