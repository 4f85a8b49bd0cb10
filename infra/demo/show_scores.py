"""Print what `valuegate score` found on the demo: lowest- and highest-valued samples, and how well the
value separates the corrupted training rows (ROC AUC of "low value = corrupted") when the file says which
rows were corrupted.

    python infra/demo/show_scores.py demo-scores.parquet
"""

from __future__ import annotations

import sys

import numpy as np
import polars as pl


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` ranking the positives first (ties count one half)."""
    ranks = pl.Series(scores).rank("average").to_numpy()
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main(path: str) -> None:
    df = pl.read_parquet(path).sort("value")
    cols = [c for c in ("row", "value", "family", "corruption", "prompt", "response") if c in df.columns]
    with pl.Config(tbl_rows=8, fmt_str_lengths=48, tbl_width_chars=160):
        print("lowest-valued samples:\n", df.select(cols).head(8))
        print("highest-valued samples:\n", df.select(cols).tail(8))
    if "corruption" in df.columns:
        bad = (df["corruption"] != "").to_numpy()
        v = df["value"].to_numpy()
        print(f"corrupted rows: {bad.sum()} of {len(bad)}; AUC of low value flagging them: {auc(-v, bad):.3f}")
        for kind in sorted(set(df["corruption"].to_list()) - {""}):
            sel = (df["corruption"] == kind).to_numpy() | ~bad
            print(f"  {kind:6s}: AUC {auc(-v[sel], bad[sel]):.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
