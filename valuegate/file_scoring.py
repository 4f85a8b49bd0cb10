"""In-memory scoring of files (``valuegate score``, :func:`valuegate.score`): read a training and a
validation file, value every training sample against the validation set, return one table.

The math is :mod:`valuegate.engine.aggregate`; nothing here touches a workspace.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import polars as pl

from valuegate.engine.aggregate import ValueMatrix, aggregate, compute_values, normalize
from valuegate.engine.baselines import BASELINE_COLUMNS, baseline_columns, unconditional_losses
from valuegate.engine.columns import FAULT_SCORE_COLUMNS, SIGNAL_COLUMNS
from valuegate.engine.faults import fault_columns, verdict
from valuegate.engine.model import LoadedModel, encode_samples, load_model, load_tokenizer
from valuegate.engine.progress import use_progress_interval
from valuegate.engine.sample import Sample
from valuegate.engine.signals import check_reference_size
from valuegate.errors import ValuegateError
from valuegate.inputs.rows import read_samples
from valuegate.settings import Settings, needs_unconditional

__all__ = ["OUTPUT_COLUMNS", "score_files", "score_samples", "summary_line"]

OUTPUT_COLUMNS = ("row", "value", "nearest_rows", "n_tokens", "truncated", "mean_loss", "self_influence",
                  *BASELINE_COLUMNS, "suspect", "fault", "suspect_reason", *FAULT_SCORE_COLUMNS,
                  *(c for c in SIGNAL_COLUMNS if c != "mean_loss"), "keep", "reason", "reason_code")


def score_files(train_path: str, valid_path: str, settings: Settings, progress: bool = True,
                lm: LoadedModel | None = None) -> tuple[pl.DataFrame, ValueMatrix]:
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
                  ) -> tuple[pl.DataFrame, ValueMatrix]:
    """:func:`score_files` on rows already read: ``train_df`` (n rows, its columns carried through) and its
    ``train`` samples (n), the ``valid`` samples (m); ``*_source`` name them in messages. Returns the table
    :func:`score_files` describes (n rows; n·m for ``pairwise``) and the value matrix. Without ``lm`` the model
    is ``loader(settings.model, tokenizer, progress)`` (e.g. the process-wide
    :func:`~valuegate.engine.model_cache.shared_model`), called once every input is tokenized. The value
    matrix's timings include ``tokenize`` and ``load_model`` (0 when ``lm`` is given)."""
    use_progress_interval(settings.progress_seconds)
    sc = settings.score
    if sc.signals and sc.aggregate != "pairwise":
        check_reference_size(len(valid), valid_source)
    clash = [c for c in OUTPUT_COLUMNS if c in train_df.columns] if sc.aggregate != "pairwise" else []
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
    vm = compute_values(lm, train, valid, settings, progress, encoded)
    vm.timings = {"tokenize": t_tok, "load_model": t_load, **vm.timings}
    values = normalize(vm, sc.normalize)
    if sc.aggregate == "pairwise":
        n_t, n_v = values.shape
        out = pl.DataFrame({
            "train_row": np.repeat(np.arange(n_t), n_v),
            "valid_row": np.tile(np.arange(n_v), n_t),
            "value": values.reshape(-1),
        })
        return out, vm
    agg, _ = aggregate(values, sc.aggregate, sc.nearest_k)
    _, nearest = aggregate(values, "nearest", sc.nearest_k)
    cols = {"row": np.arange(len(train)), "value": agg, "nearest_rows": [list(map(int, r)) for r in nearest]}
    cols.update({"n_tokens": vm.train_tokens, "truncated": [e.truncated for e in encoded[0]],
                 "mean_loss": vm.train_loss, "self_influence": vm.train_self})
    t0 = time.perf_counter()  # IFD's one extra forward pass, of the responses alone, when something reads it
    uncond = unconditional_losses(lm, train, ex, progress, "IFD") if needs_unconditional(settings) else None
    vm.timings["unconditional"] = time.perf_counter() - t0
    cols.update(baseline_columns(vm.train_loss, vm.train_tokens, uncond, vm.train_hidden, vm.valid_hidden))
    if sc.signals:
        t0 = time.perf_counter()
        cols.update(fault_columns(_faults(lm, vm, uncond, valid, settings, progress), len(train)))
        vm.timings["faults"] = time.perf_counter() - t0
    if vm.signals is not None:
        cols.update({name: col for name, col in vm.signals.items() if name != "mean_loss"})
    scored = pl.concat([train_df, pl.DataFrame(cols)], how="horizontal")
    return with_selection(scored, train, settings), vm


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


def _faults(lm: LoadedModel, vm: ValueMatrix, uncond: np.ndarray | None, valid: list[Sample], settings: Settings,
            progress: bool = False):
    """The fault detectors' verdict on the training rows (:func:`valuegate.engine.faults.verdict`); the
    unconditional losses join ``vm.train_inputs`` and ``vm.valid_inputs`` (the validation rows' pass runs here;
    with ``extract.unconditional = "never"`` neither runs and ``mismatch`` does not apply)."""
    sc = settings.score
    if uncond is None:
        vm.train_inputs["uncond_loss"] = np.full(len(vm.train_hidden), np.nan)
        vm.valid_inputs["uncond_loss"] = np.full(len(vm.valid_hidden), np.nan)
    else:
        vm.train_inputs["uncond_loss"] = np.asarray(uncond, dtype=np.float64)
        vm.valid_inputs["uncond_loss"] = unconditional_losses(lm, valid, settings.extract, progress, "IFD (validation)")
    return verdict(vm.train_inputs, vm.train_hidden, vm.valid_inputs, vm.valid_hidden, list(sc.suspect),
                   sc.suspect_neighbours, sc.fault_pool)


def summary_line(df: pl.DataFrame, vm: ValueMatrix, settings: Settings, out: str) -> str:
    """The one-line summary the CLI prints at the end."""
    sc = settings.score
    n_t, n_v = vm.values.shape
    secs = sum(vm.timings.values())
    v = df["value"].to_numpy()
    neg = int((v < 0).sum()) if sc.aggregate != "pairwise" else int((vm.values < 0).sum())
    what = "pairs" if sc.aggregate == "pairwise" else "samples"
    cut = int(df["truncated"].sum()) if "truncated" in df.columns else 0
    return (f"scored {n_t} train × {n_v} validation samples ({sc.method}, {sc.aggregate}, normalize={sc.normalize}) "
            f"in {secs:.1f}s: value median {np.median(v):.4g}, {neg} {what} below zero"
            + (f", {cut} truncated at max_length={settings.extract.max_length}" if cut else "") + f" → {out}")
