"""Scored chunks to columns: the one function every consumer of scores takes its columns from
(``valuegate score``'s output, :mod:`valuegate.file_scoring`; the stored scores table, ``tasks/score.py``; a
release's scores.parquet reads that table).

Column names and their order are :func:`~valuegate.engine.columns.sample_score_columns` after ``value`` and
the nearest validation samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from valuegate.engine.aggregate import ChunkScores
from valuegate.engine.baseline_registry import BaselineInputs, compute_baselines
from valuegate.engine.columns import SIGNAL_OUTPUT_COLUMNS
from valuegate.engine.faults import FaultScores, fault_columns

__all__ = ["score_columns"]


def score_columns(out: ChunkScores, n_tokens: np.ndarray, truncated: Sequence[bool], mean_loss: np.ndarray,
                  uncond_loss: Sequence[float | None] | np.ndarray | None, hidden: np.ndarray,
                  valid_hidden: np.ndarray, faults: FaultScores | None, complete: bool = True,
                  self_influence: np.ndarray | None = None) -> dict[str, object]:
    """The columns of n scored training samples.

    Args:
        out: the chunk scorer's output (:func:`~valuegate.engine.aggregate.score_chunk`, or
            :func:`~valuegate.engine.oracle.chunk_of_matrix`).
        n_tokens: ``(n,)`` counted positions. truncated: n flags (valued on the first ``max_length`` tokens).
        mean_loss: ``(n,)`` mean token loss. uncond_loss: ``(n,)`` IFD's loss of the response alone (None or
            NaN where undefined; None: not extracted). hidden: ``(n, d)`` and valid_hidden ``(n_v, d)`` mean
            hidden states (every registered baseline, :mod:`valuegate.engine.baseline_registry`).
        faults: the fault detectors' verdict on the n rows (None: signals off).
        complete: every column, null where not computed (the stored table's rows); False leaves out the
            verdict columns without a verdict and the signals not computed (``valuegate score``'s output).
        self_influence: ``(n,)`` the column of that name (None: ``out.self_influence``, the ``‖Φ‖²`` the
            chunk scorer normalised by).

    Returns:
        column → n values: ``value``, ``nearest`` ``(n, k)`` validation indices and ``nearest_values``
        ``(n, k)`` (None where the aggregate gives none), then :func:`~valuegate.engine.columns.sample_score_columns`
        (those computed when not ``complete``), in that order.
    """
    n = len(out.value)
    none = [None] * n
    cols: dict[str, object] = {
        "value": out.value, "nearest": out.nearest, "nearest_values": out.nearest_values,
        "n_tokens": n_tokens, "truncated": truncated, "mean_loss": mean_loss, "self_influence": out.self_influence if self_influence is None else self_influence,
        **compute_baselines(BaselineInputs(mean_loss, n_tokens, uncond_loss, hidden, valid_hidden)),
    }
    if complete or faults is not None:
        cols.update(fault_columns(faults, n))
    cols.update({c: out.signals.get(c, none) for c in SIGNAL_OUTPUT_COLUMNS if complete or c in out.signals})
    return cols
