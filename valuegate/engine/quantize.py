"""The stored form of the sparse rows (feature format 6, issue 19): int8 with one float32 scale per
support entry.

A row ``R`` ``(|U|, width)`` is stored as ``q = rint(R[u] / s_u)`` (int8, ``|q| ≤ 127``) and
``s_u = max_j |R[u, j]| / 127`` (float32): each entry within half a step, ``s_u / 2`` (``1/254`` of its
block's largest entry), and no value can leave the range, whatever the model's scale. ``1 + 4/width``
bytes a value against float16's 2. Readers get ``q · s`` in float32 (:func:`dequantize_rows`), the very
numbers :func:`quantize_rows` returns as the rounded rows: what is stored, read back and multiplied is
one set of values.

numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dequantize_rows", "quantize_rows", "stored_int8"]


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round ``(|U|, width)`` rows to the stored form.

    Returns:
        ``(q, scale, rounded)``: ``(|U|, width)`` int8, ``(|U|,)`` float32 (0 for an all-zero block) and
        ``(|U|, width)`` float32 ``q · scale``, what a reader of the stored row gets.
    """
    r = np.asarray(rows, dtype=np.float32)
    if r.ndim != 2:
        raise ValueError(f"rows of shape {r.shape}: expected (support, width)")
    scale = (np.abs(r).max(axis=1) / np.float32(127)).astype(np.float32) if r.size else np.zeros(len(r), np.float32)
    q = np.rint(np.divide(r, scale[:, None], out=np.zeros_like(r), where=scale[:, None] > 0))
    q = np.clip(q, -127, 127).astype(np.int8)
    return q, scale, dequantize_rows(q, scale)


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(|U|, width)`` float32 ``q · scale`` of stored int8 blocks ``q`` (``(|U|, width)``, or flat
    ``(|U|·width,)``) and their ``(|U|,)`` scales."""
    s = np.asarray(scale, dtype=np.float32)
    out = np.asarray(q).reshape(len(s), -1).astype(np.float32) if len(s) else np.zeros((0, 0), np.float32)
    out *= s[:, None]
    return out


def stored_int8(rows: np.ndarray, n_blocks: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The int8 blocks ``(n_blocks, width)`` and ``(n_blocks,)`` float32 scales a writer stores for
    ``rows`` (``(n_blocks, width)`` or flat). With ``scale`` (rows already in the stored form,
    :func:`quantize_rows`'s ``rounded``) ``q = rint(rows / scale)`` gives back the same ``q`` exactly;
    without, the rows are rounded here."""
    r = np.asarray(rows, dtype=np.float32).reshape(n_blocks, -1) if n_blocks else np.zeros((0, 0), np.float32)
    if scale is None:
        q, s, _ = quantize_rows(r)
        return q, s
    s = np.asarray(scale, dtype=np.float32)
    q = np.rint(np.divide(r, s[:, None], out=np.zeros_like(r), where=s[:, None] > 0))
    return np.clip(q, -127, 127).astype(np.int8), s
