"""In-memory features through the chunk scorer (``valuegate score``): the extracted validation set becomes the
:class:`~valuegate.engine.aggregate.ScoringContext` the store builds from its rows, the extracted training
set one chunk of :func:`~valuegate.engine.aggregate.score_chunk`. No I/O, and no ``(n, n_v)`` matrix for
``mean`` without the signals (one weighted validation vector, as the store).

The in-memory rows are the extraction's float32 rows (the store keeps int8 steps of them), and the
self-influence the signals path normalises by is each row's own norm (the store reads its stored column):
the values of both paths agree to the stored precision (tests/storage/test_store.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from valuegate.engine.aggregate import ChunkScores, ScoringContext, build_context, score_chunk
from valuegate.engine.forvalue import SparseFeatures, sparse_matrix, sparse_self
from valuegate.engine.signals import SparseSet
from valuegate.settings import Settings

__all__ = ["MemoryRows", "memory_context", "score_memory"]


@dataclass
class MemoryRows:
    """The per-sample columns of n in-memory samples the chunk scorer and the baselines read.

    Attributes:
        tokens: ``(n,)`` int64 counted positions. loss: ``(n,)`` float64 mean token loss (nats).
        hidden: ``(n, d)`` float64 mean hidden states.
    """

    tokens: np.ndarray
    loss: np.ndarray
    hidden: np.ndarray

    @staticmethod
    def of(feats: list[SparseFeatures]) -> MemoryRows:
        return MemoryRows(np.array([f.n_tokens for f in feats], dtype=np.int64),
                          np.array([f.mean_loss for f in feats], dtype=np.float64),
                          np.stack([f.mean_hidden for f in feats]).astype(np.float64))


def _sets(feats: list[SparseFeatures], settings: Settings, vocab: int) -> tuple[SparseSet, SparseSet | None]:
    hard = (SparseSet.from_features([f.hard for f in feats], vocab)
            if settings.extract.hard_fraction < 1.0 else None)
    return SparseSet.from_features(feats, vocab), hard


def memory_context(fv: list[SparseFeatures], settings: Settings, hidden_size: int, vocab: int) -> ScoringContext:
    """The validation side of the m extracted validation samples ``fv`` (ids: their rows 0..m-1): with the
    signals their :class:`SparseSet` (self-influence: the rows' own norms), else their CSR ``(m, V·k_h)``."""
    rows = MemoryRows.of(fv)
    if settings.score.signals:
        valid, hard = _sets(fv, settings, vocab)
        return build_context(list(range(len(fv))), None, rows.tokens, rows.hidden, settings, hidden_size, vocab,
                             valid=valid, valid_hard=hard)
    width = fv[0].rows.shape[1] if fv else 1
    return build_context(list(range(len(fv))), sparse_self(fv), rows.tokens, rows.hidden, settings, hidden_size,
                         vocab, vm=sparse_matrix(fv, vocab), width=width)


def score_memory(ctx: ScoringContext, ft: list[SparseFeatures], settings: Settings,
                 vocab: int) -> tuple[ChunkScores, MemoryRows]:
    """Value the n extracted training samples ``ft`` against ``ctx`` as one chunk.

    Returns:
        ``(ChunkScores, their MemoryRows)``; ``ChunkScores.nearest`` indexes the validation rows and
        ``ChunkScores.self_influence`` is the ``‖Φ‖²`` used (with the signals the rows' own norms, else the
        extraction's).
    """
    sc = settings.score
    rows = MemoryRows.of(ft)
    if sc.signals:
        train, hard = _sets(ft, settings, vocab)
        out = score_chunk(ctx, sc, None, rows.tokens, rows.loss, rows.hidden, train=train, train_hard=hard)
    else:
        out = score_chunk(ctx, sc, sparse_self(ft), rows.tokens, rows.loss, rows.hidden,
                          train_csr=sparse_matrix(ft, vocab))
    return out, rows
