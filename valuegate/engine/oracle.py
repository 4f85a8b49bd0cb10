"""The oracle: the dense value matrix of two sets, ``(n_train, n_valid)``, computed in full
(docs/ARCHITECTURE.md §4).

Two uses, nothing else: ``score.method = "exact"`` (full-vocabulary token kernels, for small sets: every
faster path is tested against it on tiny models) and ``score.aggregate = "pairwise"`` (the matrix is the
output). Every other scoring, in memory (``valuegate score``) or from the store (``tasks/score.py``), runs
through the chunk scorer :func:`valuegate.engine.aggregate.score_chunk`, which never builds this matrix for
``mean`` without the signals; :func:`chunk_of_matrix` turns a matrix into the chunk scorer's output so both
meet in :func:`valuegate.engine.score_columns.score_columns`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from valuegate.engine.aggregate import (
    ChunkScores,
    aggregates_of,
    normalized,
    projected_centre,
    sparse_signal_terms,
)
from valuegate.engine.encoding import EncodedSample
from valuegate.engine.ending import block_inputs, feature_inputs
from valuegate.engine.extraction import (
    ExtractionStats,
    extract_sparse,
    extract_token_blocks,
    iter_token_blocks,
)
from valuegate.engine.forvalue import exact_cross, exact_self, sparse_cross, sparse_self
from valuegate.engine.model import LoadedModel, encode_samples
from valuegate.engine.sample import Sample
from valuegate.engine.signals import SparseSet, ValidSide, cross_terms_exact, signals_from_terms
from valuegate.settings import Settings

__all__ = ["ValueMatrix", "chunk_of_matrix", "compute_values", "mean_hidden", "normalize"]

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
        train_inputs, valid_inputs: the fault detectors' per-sample inputs (name → ``(n,)``,
            :func:`valuegate.engine.ending.feature_inputs`), without ``uncond_loss``.
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
    train_inputs: dict[str, np.ndarray] | None = None
    valid_inputs: dict[str, np.ndarray] | None = None


def _token_counts(block_sample: torch.Tensor, n: int) -> np.ndarray:
    return torch.bincount(block_sample, minlength=n).cpu().numpy().astype(np.int64)


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def mean_hidden(pooled: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``(n, d)`` float64 mean hidden state per sample from ``Σ_t h_t`` ``(n, d)`` and counted positions
    ``(n,)``."""
    return np.asarray(pooled, dtype=np.float64) / np.maximum(np.asarray(tokens), 1)[:, None]


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
    sig_parts, order, hidden_parts, input_parts = [], [], [], []
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
        input_parts.append(block_inputs(block, hard))
    timings["extract_train+score"] = time.perf_counter() - t0
    vm = ValueMatrix(values, train_self, valid_self, train_tokens, _token_counts(vblock.sample, vblock.n_samples),
                     train_loss, timings, stats)
    inv = np.argsort(np.asarray(order))
    vm.train_hidden, vm.valid_hidden = np.concatenate(hidden_parts)[inv], _block_mean_hidden(vblock)
    vm.train_inputs = {name: col[inv] for name, col in _stack(input_parts).items()}
    vm.train_inputs["self_influence"] = train_self
    vm.valid_inputs = {**block_inputs(vblock, hard), "self_influence": valid_self}
    if with_signals:
        t0 = time.perf_counter()
        vm.signals = {name: col[inv] for name, col in _stack(sig_parts).items()}
    return vm



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
        encoded = (encode_samples(tok, train, ex.loss_on, ex.max_length, ex.truncation, ex.template),
                   encode_samples(tok, valid, ex.loss_on, ex.max_length, ex.truncation, ex.template))
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
    hidden = (np.stack([f.mean_hidden for f in ft]).astype(np.float64),
              np.stack([f.mean_hidden for f in fv]).astype(np.float64))
    if not settings.score.signals:
        values = sparse_cross(ft, fv, lm.vocab_size)
        timings["score"] = time.perf_counter() - t0
        return ValueMatrix(values, sparse_self(ft), sparse_self(fv),
                           np.array([f.n_tokens for f in ft], dtype=np.int64),
                           np.array([f.n_tokens for f in fv], dtype=np.int64),
                           np.array([f.mean_loss for f in ft]), timings, stats, train_hidden=hidden[0],
                           valid_hidden=hidden[1], train_inputs=feature_inputs(ft), valid_inputs=feature_inputs(fv))
    k = settings.score.nearest_k
    centre = projected_centre(ex, lm.hidden_size, lm.vocab_size, hidden[1], np.array([f.n_tokens for f in fv]))
    vs = SparseSet.from_features(fv, lm.vocab_size)
    vside = ValidSide.build(vs, centre)
    has_hard = ex.hard_fraction < 1.0

    def hard_of(fs: list) -> SparseSet | None:
        return SparseSet.from_features([f.hard for f in fs], lm.vocab_size) if has_hard else None

    terms, sig = sparse_signal_terms(SparseSet.from_features(ft, lm.vocab_size), hard_of(ft), vside, k)
    timings["score"] = time.perf_counter() - t0
    return ValueMatrix(terms.raw, terms.self_raw, vside.self_raw, terms.tokens, vs.tokens, terms.loss, timings,
                       stats, sig, train_hidden=hidden[0], valid_hidden=hidden[1],
                       train_inputs=feature_inputs(ft), valid_inputs=feature_inputs(fv))


def normalize(vm: ValueMatrix, how: str) -> np.ndarray:
    """Normalised value matrix ``(n_train, n_valid)``.

    - ``none``: the raw inner product ``⟨Φ, Φ'⟩`` (the paper's value).
    - ``length``: divided by the counted tokens of both samples (per-token alignment).
    - ``cosine``: divided by ``‖Φ‖ ‖Φ'‖`` (direction only, in [-1, 1]).
    """
    return normalized(vm.values, how, vm.train_self, vm.train_tokens, vm.valid_self, vm.valid_tokens)



def chunk_of_matrix(vm: ValueMatrix, sc) -> ChunkScores:
    """The chunk scorer's output for every training row of ``vm`` (``score`` settings ``sc``): the
    normalised matrix aggregated as :func:`~valuegate.engine.aggregate.score_chunk` does, the signals, and
    the self-influence the normalisation used (``vm.train_self``)."""
    out = aggregates_of(normalize(vm, sc.normalize), sc)
    out.signals = dict(vm.signals or {})
    out.self_influence = vm.train_self
    return out
