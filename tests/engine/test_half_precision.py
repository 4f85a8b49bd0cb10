"""The half-precision paths (``model.dtype = "bfloat16"`` / ``"float16"``, the default on a GPU) against
float32, on the CPU: the weights and the forward pass in half precision, the head, softmax and kernels in
float32 (``engine/model.py``). Scores agree in ranking (Spearman) and in what they separate (AUC of the
half-precision value against float32's upper half), for the value, the suspect score and IFD."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from tiny import random_rows, write_jsonl

import valuegate


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``score`` for ``positive`` (ties counted half)."""
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def scored(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("half")
    train = write_jsonl(folder / "t.jsonl", random_rows(48, seed=31))
    valid = write_jsonl(folder / "v.jsonl", random_rows(12, seed=32))
    model = str(tiny_model_dir("llama"))
    return {dt: valuegate.score(train, valid, model={"name": model, "device": "cpu", "dtype": dt})
            for dt in ("float32", "bfloat16", "float16")}


@pytest.mark.parametrize(("dtype", "min_rho"), [("bfloat16", 0.97), ("float16", 0.995)])
@pytest.mark.parametrize("column", ["value", "suspect", "ifd", "mean_loss"])
def test_half_precision_ranks_as_float32(scored, dtype, min_rho, column):
    ref, half = scored["float32"][column].to_numpy(), scored[dtype][column].to_numpy()
    assert np.isfinite(half).all()
    assert spearmanr(ref, half).statistic >= min_rho
    upper = ref > np.median(ref)
    assert _auc(half, upper) >= 0.95  # float32's upper half stays above its lower half
