"""Score training samples against a validation set: values, normalisation, aggregates, output table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from valuegate.engine.baselines import BASELINE_COLUMNS, baseline_columns, unconditional_losses
from valuegate.engine.extraction import (
    ExtractionStats,
    extract_sparse,
    extract_token_blocks,
    iter_token_blocks,
    projections,
)
from valuegate.engine.forvalue import (
    exact_cross,
    exact_self,
    sparse_cross,
    sparse_cross_csr,
    sparse_mean_csr,
    sparse_self,
)
from valuegate.engine.model import EncodedSample, LoadedModel, encode_samples, load_model, load_tokenizer
from valuegate.engine.sample import Sample
from valuegate.engine.signals import (
    CrossTerms,
    SparseSet,
    SuspectReference,
    ValidSide,
    calibrated_suspect,
    check_reference_size,
    cross_terms_exact,
    cross_terms_sparse,
    explain_suspect,
    hidden_neighbours,
    parse_suspect,
    signals_from_terms,
)
from valuegate.errors import ValuegateError
from valuegate.settings import Settings
from valuegate.storage.schemas import SIGNAL_COLUMNS
from valuegate.storage.scores import empty_scores, scores_table, write_scores
from valuegate.tasks.ingest import read_samples

__all__ = ["OUTPUT_COLUMNS", "ValueMatrix", "aggregate", "compute_values", "normalize", "score_files"]

SCORE_CHUNK = 8000  # train samples per scoring chunk (a multiple of read_features' 2,000-id queries)
OUTPUT_COLUMNS = ("row", "value", "nearest_rows", "n_tokens", "truncated", "mean_loss", "self_influence",
                  *BASELINE_COLUMNS, "suspect", "suspect_reason",
                  *(c for c in SIGNAL_COLUMNS if c != "mean_loss"))


@dataclass
class ValueMatrix:
    """Raw For-Value between every train and validation sample, and the per-sample terms beside it.

    Attributes:
        values: ``(n_train, n_valid)`` float64, ``⟨Φ(z), Φ(z')⟩_F``.
        train_self, valid_self: ``(n,)`` float64 self-influence ``‖Φ‖²``.
        train_tokens, valid_tokens: ``(n,)`` int64 counted positions.
        train_loss: ``(n_train,)`` float64 mean token loss in nats.
        timings: seconds per step (``extract_valid``, ``extract_train``, ``score``).
        signals: name → ``(n_train,)`` every signal of :mod:`valuegate.engine.signals` (None when off).
        reference: name → ``(n_valid,)`` the same of the validation samples, leave-one-out.
        train_neighbours, valid_neighbours: ``(n, k)`` the nearest validation samples of each training and
            (leave one out) validation sample, for the local suspect reference (None when global).
        suspect: ``(n_train,)`` the combined suspect score (None when off); suspect_reason: the largest
            deviations behind it, per sample.
        train_hidden, valid_hidden: ``(n, d)`` mean final hidden states over the counted positions (the
            ``rds`` baselines).
    """

    values: np.ndarray
    train_self: np.ndarray
    valid_self: np.ndarray
    train_tokens: np.ndarray
    valid_tokens: np.ndarray
    train_loss: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    stats: ExtractionStats = field(default_factory=ExtractionStats)
    signals: dict[str, np.ndarray] | None = None
    reference: dict[str, np.ndarray] | None = None
    train_neighbours: np.ndarray | None = None
    valid_neighbours: np.ndarray | None = None
    suspect: np.ndarray | None = None
    suspect_reason: list[str] | None = None
    train_hidden: np.ndarray | None = None
    valid_hidden: np.ndarray | None = None


def _token_counts(block_sample: torch.Tensor, n: int) -> np.ndarray:
    return torch.bincount(block_sample, minlength=n).cpu().numpy().astype(np.int64)


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def suspect_of(signals: dict[str, np.ndarray], reference: dict[str, np.ndarray], sc,
               neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, list[str]]:
    """The suspect score ``(n,)`` of ``score`` settings ``sc`` and, per sample, the deviations behind it.

    Args:
        neighbours: ``(train (n, k), validation (n_v, k))`` nearest validation samples, for the local
            reference (``sc.suspect_neighbours > 0``); None: global.
    """
    spec = parse_suspect(sc.suspect, list(signals))
    train_nb, valid_nb = neighbours if neighbours is not None else (None, None)
    ref = SuspectReference(reference, valid_nb)
    return (calibrated_suspect(signals, ref, spec, sc.suspect_combine, train_nb),
            explain_suspect(signals, ref, spec, neighbours=train_nb))


def mean_hidden(pooled: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``(n, d)`` float64 mean hidden state per sample from ``Σ_t h_t`` ``(n, d)`` and counted positions
    ``(n,)``."""
    return np.asarray(pooled, dtype=np.float64) / np.maximum(np.asarray(tokens), 1)[:, None]


def neighbours_of(train_hidden: np.ndarray, valid_hidden: np.ndarray, sc) -> tuple[np.ndarray, np.ndarray] | None:
    """The local reference's neighbourhoods (training, validation leave-one-out) from mean hidden states
    ``(n, d)`` and ``(n_v, d)``; None when ``sc.suspect_neighbours`` is 0 (global reference)."""
    k = sc.suspect_neighbours
    if not k:
        return None
    mu = valid_hidden.mean(0)
    return (hidden_neighbours(train_hidden, valid_hidden, mu, k),
            hidden_neighbours(valid_hidden, valid_hidden, mu, k, loo=True))


def _with_suspect(vm: ValueMatrix, settings: Settings) -> ValueMatrix:
    if vm.signals is not None and vm.reference is not None:
        nb = (vm.train_neighbours, vm.valid_neighbours) if vm.train_neighbours is not None else None
        vm.suspect, vm.suspect_reason = suspect_of(vm.signals, vm.reference, settings.score, nb)
    return vm


def _block_mean_hidden(block) -> np.ndarray:
    """``(n_samples, d)`` float64 mean hidden state of every sample of a token block."""
    pooled = torch.zeros(block.n_samples, block.hidden.shape[1], dtype=torch.float64).index_add_(
        0, block.sample.cpu(), block.hidden.double().cpu())
    return mean_hidden(pooled.numpy(), _token_counts(block.sample.cpu(), block.n_samples))


def _exact_values(lm: LoadedModel, enc_train: list[EncodedSample], enc_valid: list[EncodedSample],
                  train: list[Sample], valid: list[Sample], settings: Settings, progress: bool) -> ValueMatrix:
    """The exact path: the validation set's full-vocabulary probabilities stay in memory
    (``Σ positions × V × 4`` bytes); the training set streams block by block."""
    ex, k = settings.extract, settings.score.nearest_k
    ratio, hard = ex.lowest_likelihood_ratio, ex.hard_fraction
    with_signals = settings.score.signals
    timings: dict[str, float] = {}
    stats = ExtractionStats()
    t0 = time.perf_counter()
    vblock = extract_token_blocks(lm, enc_valid, ex, valid, 1.0, progress, "validation")
    timings["extract_valid"] = time.perf_counter() - t0
    mu = vblock.hidden.mean(0)
    vcent = vblock.centred(mu)
    valid_self = exact_self(vblock).numpy()
    vselfs = (valid_self, exact_self(vcent).numpy())
    n_t = len(train)
    values = np.zeros((n_t, len(valid)))
    train_self, train_loss = np.zeros(n_t), np.zeros(n_t)
    train_tokens = np.zeros(n_t, dtype=np.int64)
    sig_parts, order, hidden_parts = [], [], []
    t0 = time.perf_counter()
    for idx, block in iter_token_blocks(lm, enc_train, ex, train, 1.0, progress, "train", stats):
        main = block.hardest(ratio)
        if with_signals:
            terms = cross_terms_exact(main, vblock, vcent, mu, vselfs)
            sig = signals_from_terms(terms, k)
            if hard < 1.0:
                sig.update(signals_from_terms(cross_terms_exact(block.hardest(hard), vblock, vcent, mu, vselfs),
                                              k, prefix="hard_"))
            sig_parts.append(sig)
            values[idx], train_self[idx] = terms.raw, terms.self_raw
            train_tokens[idx], train_loss[idx] = terms.tokens, terms.loss
        else:
            values[idx] = exact_cross(main, vblock).cpu().numpy()
            train_self[idx] = exact_self(main).numpy()
            train_tokens[idx] = _token_counts(main.sample, main.n_samples)
            loss = torch.zeros(main.n_samples, dtype=torch.float64).index_add_(
                0, main.sample, -main.log_likelihood.double())
            train_loss[idx] = loss.numpy() / np.maximum(train_tokens[idx], 1)
        order.extend(idx)
        hidden_parts.append(_block_mean_hidden(main))
    timings["extract_train+score"] = time.perf_counter() - t0
    vm = ValueMatrix(values, train_self, valid_self, train_tokens, _token_counts(vblock.sample, vblock.n_samples),
                     train_loss, timings, stats)
    inv = np.argsort(np.asarray(order))
    vm.train_hidden, vm.valid_hidden = np.concatenate(hidden_parts)[inv], _block_mean_hidden(vblock)
    if with_signals:
        t0 = time.perf_counter()
        vm.signals = {name: col[inv] for name, col in _stack(sig_parts).items()}
        ref = signals_from_terms(cross_terms_exact(vblock, vblock, vcent, mu, vselfs), k, loo=True)
        if hard < 1.0:
            ref.update(signals_from_terms(cross_terms_exact(vblock.hardest(hard), vblock, vcent, mu, vselfs),
                                          k, loo=True, prefix="hard_"))
        vm.reference = ref
        nb = neighbours_of(vm.train_hidden, vm.valid_hidden, settings.score)
        if nb is not None:
            vm.train_neighbours, vm.valid_neighbours = nb
        timings["reference"] = time.perf_counter() - t0
    return _with_suspect(vm, settings)


def projected_centre(cfg, hidden_size: int, vocab_size: int, pooled_hidden: np.ndarray,
                     n_tokens: np.ndarray) -> np.ndarray:
    """``P_h μ`` (``(width,)`` float64) for the mean validation hidden state ``μ = Σ pooled / Σ tokens``.

    Args:
        cfg: extraction settings (projection seed and width). pooled_hidden: ``(n_v, d)`` ``Σ_t h_t`` per
        validation sample. n_tokens: ``(n_v,)`` their counted positions.
    """
    mu = np.asarray(pooled_hidden, dtype=np.float64).sum(0) / max(int(np.sum(n_tokens)), 1)
    ph, _ = projections(cfg, hidden_size, vocab_size)
    return mu if ph is None else ph.double().numpy() @ mu


def sparse_signal_terms(train: SparseSet, train_hard: SparseSet | None, vside: ValidSide,
                        k: int) -> tuple[CrossTerms, dict[str, np.ndarray]]:
    """Cross terms of the main rows and every signal (hard ones when ``train_hard`` is given)."""
    terms = cross_terms_sparse(train, vside)
    sig = signals_from_terms(terms, k)
    if train_hard is not None:
        sig.update(signals_from_terms(cross_terms_sparse(train_hard, vside), k, prefix="hard_"))
    return terms, sig


def reference_signals(valid: SparseSet, valid_hard: SparseSet | None, vside: ValidSide,
                      k: int) -> dict[str, np.ndarray]:
    """Every signal of the validation samples against the rest of the validation set (leave one out)."""
    ref = signals_from_terms(cross_terms_sparse(valid, vside), k, loo=True)
    if valid_hard is not None:
        ref.update(signals_from_terms(cross_terms_sparse(valid_hard, vside), k, loo=True, prefix="hard_"))
    return ref


def compute_values(lm: LoadedModel, train: list[Sample], valid: list[Sample], settings: Settings,
                   progress: bool = True,
                   encoded: tuple[list[EncodedSample], list[EncodedSample]] | None = None) -> ValueMatrix:
    """Extract both sets and compute the full value matrix with ``settings.score.method``, and (when
    ``settings.score.signals``) every signal and the suspect score.

    The exact path keeps the validation set's full-vocabulary probabilities in memory
    (``Σ positions × V × 4`` bytes) and streams the training set batch by batch; the sparse path keeps
    only the sparse rows of both sets.
    """
    ex = settings.extract
    tok = lm.tokenizer
    if encoded is None:
        encoded = (encode_samples(tok, train, ex.loss_on, ex.max_length, ex.truncation),
                   encode_samples(tok, valid, ex.loss_on, ex.max_length, ex.truncation))
    enc_train, enc_valid = encoded
    if settings.score.method == "exact":
        return _exact_values(lm, enc_train, enc_valid, train, valid, settings, progress)
    timings: dict[str, float] = {}
    stats = ExtractionStats()
    t0 = time.perf_counter()
    fv = extract_sparse(lm, enc_valid, ex, valid, 1.0, progress, "validation")
    timings["extract_valid"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ft = extract_sparse(lm, enc_train, ex, train, ex.lowest_likelihood_ratio, progress, "train", stats)
    timings["extract_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hidden = (mean_hidden(np.stack([f.pooled_hidden for f in ft]), np.array([f.n_tokens for f in ft])),
              mean_hidden(np.stack([f.pooled_hidden for f in fv]), np.array([f.n_tokens for f in fv])))
    if not settings.score.signals:
        values = sparse_cross(ft, fv, lm.vocab_size)
        timings["score"] = time.perf_counter() - t0
        return ValueMatrix(values, sparse_self(ft), sparse_self(fv),
                           np.array([f.n_tokens for f in ft], dtype=np.int64),
                           np.array([f.n_tokens for f in fv], dtype=np.int64),
                           np.array([f.mean_loss for f in ft]), timings, stats, train_hidden=hidden[0],
                           valid_hidden=hidden[1])
    k = settings.score.nearest_k
    centre = projected_centre(ex, lm.hidden_size, lm.vocab_size, np.stack([f.pooled_hidden for f in fv]),
                              np.array([f.n_tokens for f in fv]))
    vs = SparseSet.from_features(fv, lm.vocab_size)
    vside = ValidSide.build(vs, centre)
    has_hard = ex.hard_fraction < 1.0

    def hard_of(fs: list) -> SparseSet | None:
        return SparseSet.from_features([f.hard for f in fs], lm.vocab_size) if has_hard else None

    terms, sig = sparse_signal_terms(SparseSet.from_features(ft, lm.vocab_size), hard_of(ft), vside, k)
    timings["score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_signals(vs, hard_of(fv), vside, k)
    vm = ValueMatrix(terms.raw, terms.self_raw, vside.self_raw, terms.tokens, vs.tokens, terms.loss, timings,
                     stats, sig, ref, train_hidden=hidden[0], valid_hidden=hidden[1])
    nb = neighbours_of(vm.train_hidden, vm.valid_hidden, settings.score)
    if nb is not None:
        vm.train_neighbours, vm.valid_neighbours = nb
    timings["reference"] = time.perf_counter() - t0
    return _with_suspect(vm, settings)


def normalize(vm: ValueMatrix, how: str) -> np.ndarray:
    """Normalised value matrix ``(n_train, n_valid)``.

    - ``none``: the raw inner product ``⟨Φ, Φ'⟩`` (the paper's value).
    - ``length``: divided by the counted tokens of both samples (per-token alignment).
    - ``cosine``: divided by ``‖Φ‖ ‖Φ'‖`` (direction only, in [-1, 1]).
    """
    if how == "none":
        return vm.values
    if how == "length":
        return vm.values / np.outer(np.maximum(vm.train_tokens, 1), np.maximum(vm.valid_tokens, 1))
    if how == "cosine":
        denom = np.sqrt(np.outer(np.maximum(vm.train_self, 0), np.maximum(vm.valid_self, 0)))
        return np.divide(vm.values, denom, out=np.zeros_like(vm.values), where=denom > 0)
    raise ValuegateError(f"unknown normalisation {how!r}: use none, length or cosine")


def aggregate(values: np.ndarray, how: str, k: int = 5) -> tuple[np.ndarray, np.ndarray | None]:
    """Aggregate a ``(n_train, n_valid)`` matrix over the validation set.

    Returns:
        ``(n_train,)`` values and, for ``nearest``, ``(n_train, min(k, n_valid))`` validation indices of
        the top alignments in decreasing order (else None).
    """
    if values.shape[1] == 0:
        raise ValuegateError("the validation set is empty")
    if how == "mean":
        return values.mean(axis=1), None
    if how == "nearest":
        k = min(k, values.shape[1])
        top = np.argsort(-values, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(values, top, axis=1).mean(axis=1), top
    raise ValuegateError(f"unknown aggregate {how!r}: use mean, nearest or pairwise")


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
    train_df, train = read_samples(train_path)
    _, valid = read_samples(valid_path)
    return score_samples(train_df, train, valid, settings, progress, lm, str(train_path), str(valid_path))


def score_samples(train_df: pl.DataFrame, train: list[Sample], valid: list[Sample], settings: Settings,
                  progress: bool = True, lm: LoadedModel | None = None, train_source: str = "train",
                  valid_source: str = "valid") -> tuple[pl.DataFrame, ValueMatrix]:
    """:func:`score_files` on rows already read: ``train_df`` (n rows, its columns carried through) and its
    ``train`` samples (n), the ``valid`` samples (m); ``*_source`` name them in messages. Returns the table
    :func:`score_files` describes (n rows; n·m for ``pairwise``) and the value matrix."""
    sc = settings.score
    if sc.signals and sc.aggregate != "pairwise":
        check_reference_size(len(valid), valid_source)
    clash = [c for c in OUTPUT_COLUMNS if c in train_df.columns] if sc.aggregate != "pairwise" else []
    if clash:
        raise ValuegateError(f"{train_source}: has column(s) {clash} that the output adds; rename them")
    # every input is checked (tokenized) before any weight is read
    tok = lm.tokenizer if lm is not None else load_tokenizer(settings.model)
    ex = settings.extract
    encoded = (encode_samples(tok, train, ex.loss_on, ex.max_length, ex.truncation),
               encode_samples(tok, valid, ex.loss_on, ex.max_length, ex.truncation))
    if lm is None:
        lm = load_model(settings.model, tok, progress)
    vm = compute_values(lm, train, valid, settings, progress, encoded)
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
    t0 = time.perf_counter()
    uncond = unconditional_losses(lm, train, ex)  # IFD's one extra forward pass, of the responses alone
    vm.timings["unconditional"] = time.perf_counter() - t0
    cols.update(baseline_columns(vm.train_loss, vm.train_tokens, uncond, vm.train_hidden, vm.valid_hidden))
    if vm.signals is not None:
        cols["suspect"] = vm.suspect
        cols["suspect_reason"] = vm.suspect_reason
        cols.update({name: col for name, col in vm.signals.items() if name != "mean_loss"})
    return pl.concat([train_df, pl.DataFrame(cols)], how="horizontal"), vm


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


# --------------------------------------------------------------------------------------------------
# Scoring a stored dataset against a registered validation-set version (`valuegate score-set`).
# --------------------------------------------------------------------------------------------------


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
    unscored_ids: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unscored(self) -> dict[str, int]:
        """Samples of the dataset that reached extraction and got no score, by reason
        (:func:`~valuegate.engine.model.refusal_reason`); their ids and full messages: ``unscored_ids``."""
        return unscored_counts(self.unscored_ids)

    def line(self) -> str:
        """One human line."""
        secs = " ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
        unscored = ", ".join(f"{n} {why}" for why, n in self.unscored.items())
        return (f"scores run {self.run_id}: {self.dataset} ({self.n_train} samples) against {self.valset} "
                f"({self.n_valid}) with features {self.model_fp[:12]}: {secs}"
                + (f"; {self.truncated} truncated at max_length" if self.truncated else "")
                + (f"; not scored: {unscored}" if unscored else ""))


def unscored_counts(unscored_ids) -> dict[str, int]:
    """``{reason: count}`` of ``(id, refusal message)`` pairs, keyed by
    :func:`~valuegate.engine.model.refusal_reason` (what every runner reports as ``unscored``)."""
    from collections import Counter

    from valuegate.engine.model import refusal_reason

    return dict(Counter(refusal_reason(why) for _, why in unscored_ids))


def _aligned(t, ids: list[str]):
    """The rows of a feature slice in the order of ``ids`` (every id must have a row)."""
    import pyarrow.compute as pc

    pos = pc.index_in(pa_array(ids), value_set=t.column("id"))
    if pos.null_count:
        raise ValuegateError(f"{pos.null_count} samples have no stored features; run `valuegate extract` again")
    return t.take(pos)


def _pooled(t, n: int) -> np.ndarray:
    """``(n, d)`` float64 ``Σ_t h_t`` of a feature slice's ``pooled_hidden`` column."""
    return np.asarray(t["pooled_hidden"].combine_chunks().values.to_numpy(zero_copy_only=False),
                      dtype=np.float64).reshape(n, -1)


def _feature_matrix(t, ids: list[str], vocab: int, width: int):
    """CSR ``(len(ids), V·width)`` and per-sample columns of a feature slice, in the order of ``ids``."""
    import scipy.sparse as sp

    from valuegate.storage.features import sparse_arrays

    t = _aligned(t, ids)
    indptr, indices, data = sparse_arrays(t, width)
    m = sp.csr_matrix((data, indices, indptr), shape=(len(ids), vocab * width))
    return m, t


def mean_aggregate(train, valid, train_self: np.ndarray, valid_self: np.ndarray, train_tokens: np.ndarray,
                   valid_tokens: np.ndarray, how: str) -> np.ndarray:
    """The ``mean`` aggregate under each normalisation, through one weighted validation vector.

    ``none``: ``mean_j v``; ``length``: ``mean_j v / (n n'_j)``; ``cosine``: ``mean_j v / (‖Φ‖ ‖Φ'_j‖)``
    (exactly :func:`normalize` then the mean, without forming the pairwise matrix).

    Args:
        train, valid: ``(n, V·k_h)`` CSR matrices of sparse rows. Others: ``(n,)`` per-sample columns.

    Returns:
        ``(n_train,)`` float64.
    """
    n_v = valid.shape[0]
    if how == "none":
        return sparse_mean_csr(train, valid)
    if how == "length":
        out = sparse_mean_csr(train, valid, 1.0 / (n_v * np.maximum(valid_tokens, 1)))
        return out / np.maximum(train_tokens, 1)
    if how == "cosine":
        vn = np.sqrt(np.maximum(valid_self, 0))
        w = np.divide(1.0, n_v * vn, out=np.zeros_like(vn), where=vn > 0)
        tn = np.sqrt(np.maximum(train_self, 0))
        return np.divide(sparse_mean_csr(train, valid, w), tn, out=np.zeros_like(tn), where=tn > 0)
    raise ValuegateError(f"unknown normalisation {how!r}: use none, length or cosine")


def pa_array(values: list[str]):
    """A pyarrow string array (kept local so the math modules never need pyarrow)."""
    import pyarrow as pa

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


@dataclass
class ScoringContext:
    """The validation side of a scores run, read once (per process) and reused for every chunk.

    Attributes:
        vids: ``(n_v,)`` object array of validation ids. v_self, v_tok: ``(n_v,)`` ``‖Φ'‖²`` and counted
            positions. vside: the sparse right-hand side of every product (signals on); vm: plain CSR
            ``(n_v, V·width)`` (signals off). reference: the leave-one-out signals; v_hidden: ``(n_v, d)``
            mean hidden states and valid_nb ``(n_v, k)`` their nearest others (local suspect reference).
    """

    vids: np.ndarray
    v_self: np.ndarray
    v_tok: np.ndarray
    vside: ValidSide | None = None
    vm: object = None
    reference: dict[str, np.ndarray] | None = None
    v_hidden: np.ndarray | None = None
    valid_nb: np.ndarray | None = None


def _feature_columns(settings: Settings) -> list[str]:
    """The feature columns a scoring chunk reads."""
    ex, sc = settings.extract, settings.score
    cols = ["id", "truncated", "token_ids", "rows", "n_tokens", "mean_loss", "uncond_loss", "self_influence",
            "pooled_hidden"]
    if sc.signals:
        cols.append("error_sum")
        if ex.hard_fraction < 1.0:
            cols += ["hard_token_ids", "hard_rows", "hard_error_sum", "hard_n_tokens", "hard_mean_loss"]
    return cols


def plan_scoring(ws, dataset: str, valset_ref: str, settings: Settings, progress: bool = True,
                 cache: dict | None = None) -> tuple[ScoringPlan, object, object, dict[str, float]]:
    """Resolve a scores run: the dataset's ids, the pinned validation version, the fingerprints; extract the
    features still missing (training samples here only when the runner did not extract them already).

    Returns:
        ``(plan, extract report of the training side, of the validation side, timings)`` with
        ``resolve`` and ``extract`` seconds.
    """
    import datetime as dt
    import json
    import uuid

    from valuegate.engine.model import fingerprint_settings, model_fingerprint
    from valuegate.storage import features as fstore
    from valuegate.storage import samples as sstore
    from valuegate.storage.valsets import read_valset
    from valuegate.tasks.extract import extract_dataset, extract_to_store
    from valuegate.tasks.valsets import valset_samples

    ex, sc = settings.extract, settings.score
    if sc.method != "sparse":
        raise ValuegateError("score-set scores from the feature store, which keeps sparse features; "
                             "use `valuegate score --method exact` on files for the exact oracle")
    if sc.aggregate == "pairwise":
        raise ValuegateError("score-set writes one value per sample: use --aggregate mean or nearest "
                             "(`valuegate score` gives the pairwise matrix)")
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
    fp_t_settings = fingerprint_settings(settings.model, ex, tok, ex.lowest_likelihood_ratio)
    fp_v_settings = fingerprint_settings(settings.model, ex, tok, 1.0)
    fp_t, fp_v = model_fingerprint(fp_t_settings), model_fingerprint(fp_v_settings)
    cache = {} if cache is None else cache

    def loader() -> LoadedModel:
        if "lm" not in cache:
            cache["lm"] = load_model(settings.model, tok, progress)
        return cache["lm"]

    timings = {"resolve": time.perf_counter() - t0}
    t0 = time.perf_counter()
    rep_t = extract_dataset(ws, dataset, settings, progress, cache, tok)
    refused = {i for i, _ in rep_t.refused or []}
    rep_v = extract_to_store(ws, loader, vids, vsamples, ex, fp_v, fp_v_settings, 1.0, progress=progress,
                             desc="validation")
    if rep_v.refused:
        raise ValuegateError(f"{valset}: a validation sample cannot be valued: {rep_v.refused[0][1]}")
    timings["extract"] = time.perf_counter() - t0
    meta = fstore.read_feature_set(ws, fp_t)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    settings_json = json.dumps({"settings": settings.model_dump(mode="json"), "train_fp": fp_t,
                                "valid_fp": fp_v}, sort_keys=True)
    plan = ScoringPlan(ws.uri, dataset, valset, list(vids), [i for i in ids if i not in refused], fp_t, fp_v,
                       int(meta["vocab_size"]), int(meta["row_width"]), int(meta["hidden_size"]), run_id,
                       settings_json)
    return plan, rep_t, rep_v, timings


def load_context(ws, plan: ScoringPlan, settings: Settings) -> ScoringContext:
    """Read the validation side of ``plan`` from the store and build everything chunks are scored against."""
    from valuegate.storage import features as fstore

    ex, sc = settings.extract, settings.score
    vids, vocab, width = plan.vids, plan.vocab, plan.width
    cols = _feature_columns(settings)
    vrows = fstore.read_features(ws, plan.fp_v, vids, cols)
    # with the signals on, the rows become CSR inside SparseSet (raw and centred): no plain CSR is built
    vm, vt = (None, _aligned(vrows, vids)) if sc.signals else _feature_matrix(vrows, vids, vocab, width)
    ctx = ScoringContext(np.asarray(vids, dtype=object), vt["self_influence"].to_numpy(),
                         vt["n_tokens"].to_numpy().astype(np.int64), vm=vm)
    pooled = _pooled(vt, len(vids))
    ctx.v_hidden = mean_hidden(pooled, ctx.v_tok)  # the rds baselines, and the local suspect reference
    if sc.signals:
        vs = SparseSet.from_arrow(vt, vocab, width)
        ctx.vside = ValidSide.build(vs, projected_centre(ex, plan.hidden_size, vocab, pooled, ctx.v_tok))
        hard = SparseSet.from_arrow(vt, vocab, width, "hard_") if ex.hard_fraction < 1.0 else None
        ctx.reference = reference_signals(vs, hard, ctx.vside, sc.nearest_k)
        if sc.suspect_neighbours > 0:
            ctx.valid_nb = hidden_neighbours(ctx.v_hidden, ctx.v_hidden, ctx.v_hidden.mean(0),
                                             sc.suspect_neighbours, loo=True)
    return ctx


def score_rows(ws, plan: ScoringPlan, ctx: ScoringContext, settings: Settings,
               ids: list[str]) -> tuple[object, float, float]:
    """Score the training samples ``ids`` of ``plan`` against the context: one row of the scores table each.

    Returns:
        ``(pyarrow table in schemas.scores_schema, seconds reading, seconds scoring)``.
    """
    import datetime as dt

    from valuegate.storage import features as fstore
    from valuegate.storage import schemas

    ex, sc = settings.extract, settings.score
    vocab, width, k = plan.vocab, plan.width, sc.nearest_k
    t0 = time.perf_counter()
    trows = fstore.read_features(ws, plan.fp_t, ids, _feature_columns(settings))
    tm, tt = (None, _aligned(trows, ids)) if sc.signals else _feature_matrix(trows, ids, vocab, width)
    t_read = time.perf_counter() - t0
    t_self = tt["self_influence"].to_numpy()
    t_tok = tt["n_tokens"].to_numpy().astype(np.int64)
    t_loss = tt["mean_loss"].to_numpy().astype(np.float64)
    n = len(ids)
    t_hidden = mean_hidden(_pooled(tt, n), t_tok)
    baselines = baseline_columns(t_loss, t_tok, tt["uncond_loss"].to_pylist(), t_hidden, ctx.v_hidden)
    signals: dict[str, np.ndarray] = {}
    suspect = reasons = near = near_v = None
    if sc.signals:
        ts = SparseSet.from_arrow(tt, vocab, width)
        hard = SparseSet.from_arrow(tt, vocab, width, "hard_") if ex.hard_fraction < 1.0 else None
        terms, signals = sparse_signal_terms(ts, hard, ctx.vside, k)
        nb = None
        if ctx.valid_nb is not None:
            nb = (hidden_neighbours(t_hidden, ctx.v_hidden, ctx.v_hidden.mean(0),
                                    sc.suspect_neighbours), ctx.valid_nb)
        suspect, reasons = suspect_of(signals, ctx.reference, sc, nb)
        raw = terms.raw
    elif sc.aggregate == "mean":
        agg = mean_aggregate(tm, ctx.vm, t_self, ctx.v_self, t_tok, ctx.v_tok, sc.normalize)
        raw = None
    else:
        raw = sparse_cross_csr(tm, ctx.vm)
    if raw is not None:
        values = normalize(ValueMatrix(raw, t_self, ctx.v_self, t_tok, ctx.v_tok, t_loss), sc.normalize)
        agg = aggregate(values, sc.aggregate, k)[0]
        near = aggregate(values, "nearest", k)[1]
        near_v = np.take_along_axis(values, near, 1)
    now = dt.datetime.now(dt.timezone.utc)
    none = [None] * n
    rows = {
        "run_id": [plan.run_id] * n, "dataset": [plan.dataset] * n, "id": ids, "value": agg,
        "aggregate": [sc.aggregate] * n, "normalize": [sc.normalize] * n,
        "nearest_ids": [list(ctx.vids[r]) for r in near] if near is not None else none,
        "nearest_values": [list(r) for r in near_v] if near_v is not None else none,
        "n_tokens": t_tok, "truncated": tt["truncated"].fill_null(False), "mean_loss": t_loss,
        "self_influence": t_self, **baselines,
        "suspect": suspect if suspect is not None else none,
        "suspect_reason": reasons if reasons is not None else none,
        **{c: signals.get(c, none) for c in schemas.SIGNAL_COLUMNS if c != "mean_loss"},
        "valset": [plan.valset] * n, "model_fp": [plan.fp_t] * n, "settings": [plan.settings_json] * n,
        "at": [now] * n,
    }
    table = scores_table(rows)
    return table, t_read, time.perf_counter() - t0 - t_read


def score_dataset(ws, dataset: str, valset_ref: str, settings: Settings, progress: bool = True,
                  write: bool = True) -> ScoreRunReport:
    """Score every sample of a stored dataset against ``name@vN`` and write one ``scores`` run.

    Features come from the store; only samples without features for the fingerprint are run through the
    model (so a new validation version costs the extraction of the validation samples alone). Training
    features stream in chunks of :data:`SCORE_CHUNK`: memory holds one chunk's sparse rows (float64 while
    multiplied), never the whole dataset's.
    """
    import pyarrow as pa
    import pyarrow.compute as pc


    plan, rep_t, rep_v, timings = plan_scoring(ws, dataset, valset_ref, settings, progress)
    t0 = time.perf_counter()
    ctx = load_context(ws, plan, settings)
    timings["read"] = time.perf_counter() - t0
    timings["score"] = 0.0
    tables = []
    for lo in range(0, len(plan.ids), SCORE_CHUNK):
        table, t_read, t_score = score_rows(ws, plan, ctx, settings, plan.ids[lo:lo + SCORE_CHUNK])
        tables.append(table)
        timings["read"] += t_read
        timings["score"] += t_score
    table = pa.concat_tables(tables) if tables else empty_scores()
    if write:
        t0 = time.perf_counter()
        write_scores(ws, table)
        timings["write"] = time.perf_counter() - t0
    return ScoreRunReport(plan.run_id, dataset, plan.valset, plan.fp_t, len(plan.ids), len(plan.vids), rep_t,
                          rep_v, timings, table, int(pc.sum(table["truncated"]).as_py() or 0),
                          list(rep_t.refused or []))


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
    import os

    from valuegate.storage.lance import Workspace

    ws = Workspace.from_env(plan.workspace)
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
