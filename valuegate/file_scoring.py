"""In-memory scoring of files (``valuegate score``, :func:`valuegate.score`): read a training and a
validation file, value every training sample against the validation set, return one table.

The extracted features go through the store's chunk scorer as one chunk
(:mod:`valuegate.engine.memory_scoring`); ``exact`` and ``pairwise`` through the dense oracle
(:mod:`valuegate.engine.oracle`); the columns are :func:`valuegate.engine.score_columns.score_columns`, as the
store's. Nothing here touches a workspace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from valuegate.engine.baselines import unconditional_losses
from valuegate.engine.columns import sample_score_columns
from valuegate.engine.ending import feature_inputs
from valuegate.engine.extraction import ExtractionStats, extract_sparse
from valuegate.engine.faults import verdict
from valuegate.engine.memory_scoring import memory_context, score_memory
from valuegate.engine.model import LoadedModel, encode_samples, load_model, load_tokenizer
from valuegate.engine.oracle import ValueMatrix, chunk_of_matrix, compute_values, normalize
from valuegate.engine.progress import use_progress_interval
from valuegate.engine.sample import Sample
from valuegate.engine.score_columns import score_columns
from valuegate.engine.signals import check_reference_size
from valuegate.errors import ValuegateError
from valuegate.inputs.rows import read_samples
from valuegate.settings import Settings, needs_unconditional

__all__ = ["FileScoring", "output_columns", "score_files", "score_samples", "summary_line"]


def output_columns() -> tuple[str, ...]:
    """The columns the output adds to the training file's (``mean``/``nearest``)."""
    return ("row", "value", "nearest_rows", *sample_score_columns(), "keep", "reason", "reason_code")


@dataclass
class FileScoring:
    """What scoring two files did, beside the table.

    Attributes:
        n_train, n_valid: samples valued and validated against. timings: seconds per step (``tokenize``,
            ``load_model``, ``extract_valid``, ``extract_train``, ``score``, ...). stats: the extraction's.
        matrix: the dense value matrix ``(n_train, n_valid)`` of the oracle paths (``score.method = "exact"``
            or ``score.aggregate = "pairwise"``, :mod:`valuegate.engine.oracle`); None on the chunk scorer's.
        train_inputs, valid_inputs: the fault detectors' per-row inputs (name → ``(n,)``; ``uncond_loss``
            among them once the detectors ran). train_hidden, valid_hidden: ``(n, d)`` float64 mean hidden
            states (the rds baselines, the detectors' neighbourhoods). None for ``pairwise``.
    """

    n_train: int
    n_valid: int
    timings: dict[str, float] = field(default_factory=dict)
    stats: ExtractionStats = field(default_factory=ExtractionStats)
    matrix: ValueMatrix | None = None
    train_inputs: dict[str, np.ndarray] | None = None
    valid_inputs: dict[str, np.ndarray] | None = None
    train_hidden: np.ndarray | None = None
    valid_hidden: np.ndarray | None = None


def score_files(train_path: str, valid_path: str, settings: Settings, progress: bool = True,
                lm: LoadedModel | None = None) -> tuple[pl.DataFrame, FileScoring]:
    """``valuegate score``: read both files, value every train sample, return the output table.

    For ``mean``/``nearest`` the table has every input column of TRAIN plus ``row``, ``value``,
    ``nearest_rows`` (the validation rows of the top-k alignments), ``n_tokens``, ``truncated`` (valued on
    its first ``max_length`` tokens only; under ``extract.truncation = "refuse"`` such a sample is an error
    naming it), ``mean_loss``, ``self_influence``, the baselines ``perplexity``, ``length``, ``ifd``, ``rds_mean`` and
    ``rds_max`` (:mod:`valuegate.engine.baselines`), and with ``score.signals`` the combined ``suspect`` score and one column per signal
    (:mod:`valuegate.engine.signals`); for ``pairwise`` it is long: ``train_row``, ``valid_row``, ``value``.
    """
    train_df, train = read_samples(train_path, settings.data.fields)
    _, valid = read_samples(valid_path, settings.data.fields)
    return score_samples(train_df, train, valid, settings, progress, lm, str(train_path), str(valid_path))


def score_samples(train_df: pl.DataFrame, train: list[Sample], valid: list[Sample], settings: Settings,
                  progress: bool = True, lm: LoadedModel | None = None, train_source: str = "train",
                  valid_source: str = "valid", loader: Callable[..., LoadedModel] = load_model
                  ) -> tuple[pl.DataFrame, FileScoring]:
    """:func:`score_files` on rows already read: ``train_df`` (n rows, its columns carried through) and its
    ``train`` samples (n), the ``valid`` samples (m); ``*_source`` name them in messages. Returns the table
    :func:`score_files` describes (n rows; n·m for ``pairwise``) and a :class:`FileScoring` (the dense value
    matrix only for ``exact`` and ``pairwise``). Without ``lm`` the model is ``loader(settings.model, tokenizer,
    progress)`` (e.g. the process-wide :func:`~valuegate.engine.model_cache.shared_model`), called once every
    input is tokenized. The timings include ``tokenize`` and ``load_model`` (0 when ``lm`` is given).

    ``nearest_rows`` is null for ``mean`` without the signals: that path values each sample with one
    weighted validation vector, never the ``(n, m)`` matrix (as the store does)."""
    use_progress_interval(settings.progress_seconds)
    sc = settings.score
    if sc.signals and sc.aggregate != "pairwise":
        check_reference_size(len(valid), valid_source)
    clash = [c for c in output_columns() if c in train_df.columns] if sc.aggregate != "pairwise" else []
    if clash:
        raise ValuegateError(f"{train_source}: has column(s) {clash} that the output adds; rename them")
    # every input is checked (tokenized) before any weight is read
    t0 = time.perf_counter()
    tok = lm.tokenizer if lm is not None else load_tokenizer(settings.model)
    ex = settings.extract
    encoded = (encode_samples(tok, train, ex.loss_on, ex.max_length, ex.truncation, ex.template),
               encode_samples(tok, valid, ex.loss_on, ex.max_length, ex.truncation, ex.template))
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    if lm is None:
        lm = loader(settings.model, tok, progress)
    t_load = time.perf_counter() - t0
    timings = {"tokenize": t_tok, "load_model": t_load}
    n, n_v = len(train), len(valid)
    if sc.method == "exact" or sc.aggregate == "pairwise":  # the oracle: the dense value matrix
        vm = compute_values(lm, train, valid, settings, progress, encoded)
        timings.update(vm.timings)
        report = FileScoring(n, n_v, timings, vm.stats, vm)
        if sc.aggregate == "pairwise":
            values = normalize(vm, sc.normalize)
            return pl.DataFrame({"train_row": np.repeat(np.arange(n), n_v), "valid_row": np.tile(np.arange(n_v), n),
                                 "value": values.reshape(-1)}), report
        chunk, tokens, loss = chunk_of_matrix(vm, sc), vm.train_tokens, vm.train_loss
        hidden, inputs = (vm.train_hidden, vm.valid_hidden), (vm.train_inputs, vm.valid_inputs)
    else:  # the store's chunk scorer, on the in-memory features as one chunk
        report = FileScoring(n, n_v, timings)
        t0 = time.perf_counter()
        fv = extract_sparse(lm, encoded[1], ex, valid, 1.0, progress, "validation")
        timings["extract_valid"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ft = extract_sparse(lm, encoded[0], ex, train, ex.lowest_likelihood_ratio, progress, "train", report.stats)
        timings["extract_train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ctx = memory_context(fv, settings, lm.hidden_size, lm.vocab_size)
        chunk, rows = score_memory(ctx, ft, settings, lm.vocab_size)
        timings["score"] = time.perf_counter() - t0
        tokens, loss = rows.tokens, rows.loss
        hidden, inputs = (rows.hidden, ctx.v_hidden), (feature_inputs(ft), feature_inputs(fv))
    report.train_inputs, report.valid_inputs = inputs
    report.train_hidden, report.valid_hidden = hidden
    t0 = time.perf_counter()  # IFD's one extra forward pass, of the responses alone, when something reads it
    uncond = unconditional_losses(lm, train, ex, progress, "IFD") if needs_unconditional(settings) else None
    timings["unconditional"] = time.perf_counter() - t0
    faults = None
    if sc.signals:
        t0 = time.perf_counter()
        faults = _faults(lm, inputs, hidden, uncond, valid, settings, progress)
        timings["faults"] = time.perf_counter() - t0
    cols = score_columns(chunk, tokens, [e.truncated for e in encoded[0]], loss, uncond, *hidden, faults,
                         complete=False)
    nearest = cols.pop("nearest")
    del cols["nearest_values"]
    near = pl.Series("nearest_rows", [list(map(int, r)) for r in nearest] if nearest is not None else [None] * n,
                     dtype=pl.List(pl.Int64))
    scored = pl.concat([train_df, pl.DataFrame({"row": np.arange(n), "value": cols.pop("value")}).with_columns(near),
                        pl.DataFrame(cols)], how="horizontal")
    return with_selection(scored, train, settings), report


def with_selection(scored: pl.DataFrame, train: list[Sample], settings: Settings) -> pl.DataFrame:
    """``scored`` with what the ``select`` step of a run would decide for each row: ``keep`` (bool) and
    ``reason`` (why dropped; empty when kept), and any other column the policy adds
    (:func:`valuegate.tasks.select.select_samples`, the very code of the run; ties broken by sample id as
    there). A policy that needs a column the scores lack (``suspect`` without ``score.signals``) adds
    nothing and warns."""
    import warnings

    from valuegate.inputs.identity import sample_id, sample_record
    from valuegate.tasks.select import select_samples

    ids = [sample_id(sample_record(s)) for s in train]
    try:
        selected = select_samples(scored.with_columns(pl.Series("id", ids, dtype=pl.String)), settings.select)
    except ValuegateError as exc:
        warnings.warn(f"no keep column: select.policy = {settings.select.policy}: {exc}", stacklevel=3)
        return scored
    added = [c for c in selected.columns if c not in scored.columns and c != "id"]
    return scored.with_columns(selected.select(added))


def _faults(lm: LoadedModel, inputs: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
            hidden: tuple[np.ndarray, np.ndarray], uncond: np.ndarray | None, valid: list[Sample],
            settings: Settings, progress: bool = False):
    """The fault detectors' verdict on the training rows (:func:`valuegate.engine.faults.verdict`).

    Args:
        inputs: the detectors' per-row inputs of the training and the validation rows (name → ``(n,)``,
            ``(n_v,)``), without ``uncond_loss``: the unconditional losses join them here (the validation rows'
            pass runs here; with ``extract.unconditional = "never"`` neither runs and ``mismatch`` does not
            apply). hidden: ``(n, d)`` and ``(n_v, d)`` mean hidden states.
    """
    sc = settings.score
    train_in, valid_in = inputs
    if uncond is None:
        train_in["uncond_loss"] = np.full(len(hidden[0]), np.nan)
        valid_in["uncond_loss"] = np.full(len(hidden[1]), np.nan)
    else:
        train_in["uncond_loss"] = np.asarray(uncond, dtype=np.float64)
        valid_in["uncond_loss"] = unconditional_losses(lm, valid, settings.extract, progress, "IFD (validation)")
    return verdict(train_in, hidden[0], valid_in, hidden[1], list(sc.suspect), sc.suspect_neighbours,
                   sc.fault_pool)


def summary_line(df: pl.DataFrame, report: FileScoring, settings: Settings, out: str) -> str:
    """The one-line summary the CLI prints at the end."""
    sc = settings.score
    secs = sum(report.timings.values())
    v = df["value"].to_numpy()
    neg = int((v < 0).sum())
    what = "pairs" if sc.aggregate == "pairwise" else "samples"
    cut = int(df["truncated"].sum()) if "truncated" in df.columns else 0
    return (f"scored {report.n_train} train × {report.n_valid} validation samples ({sc.method}, {sc.aggregate}, "
            f"normalize={sc.normalize}) in {secs:.1f}s: value median {np.median(v):.4g}, {neg} {what} below zero"
            + (f", {cut} truncated at max_length={settings.extract.max_length}" if cut else "") + f" → {out}")
