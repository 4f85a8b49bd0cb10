"""Alternatives to the fault detectors' reference, calibration and combination, chosen leave-one-set-out
(issue 27, the cells where a one-line baseline still wins).

    .venv/bin/python -m tests.benchmarks.bench_faults_variants [--out bench-results] [--no-mechanisms]

Reads what ``bench_faults`` cached and wrote (``<out>/faults-scores-*.parquet``, ``<out>/faults.json``: run
that first, with the sizes of docs/benchmarks.md); no forward pass but for the mechanism variants (below). Each
variant recomputes ``suspect`` from the cached inputs with :mod:`valuegate.engine.faults`' own pieces (neighbours,
robust spread) and changes one thing:

- **combination** of the calibrated scores (the default: the largest): sum, root-sum-square, the two largest,
  a soft maximum, Fisher's and Bonferroni's combination of one-sided normal p-values; each re-calibrated on the
  validation rows' own combined score so that the threshold keeps its meaning;
- **location** of a row's reference: the pool's median (``global``), the neighbours' median shrunk toward it
  by a fixed weight, or by a slope fitted on the validation rows (``beta``, ``theil``), or whichever gives the
  validation rows the smaller spread (``choose``); for ``garbled`` alone;
- **trimming**: a second pass whose neighbourhoods leave out the pool's training rows scored above ``t``;
- **calibration scale**: from the whole pool (training rows too, robust upper quantiles) or from the
  validation rows at other quantiles;
- **neighbours**: ``k`` other than the default 100 (``score.suspect_neighbours``);
- **spread**: each row's deviation over the robust spread of its neighbours' own deviations (a local spread)
  before the calibration;
- **tail**: ``cut`` on ``end_loss`` itself, ``log(1 + end_loss)`` or ``log(0.1 + end_loss)`` (the default:
  ``sqrt(end_loss)``);
- **length**: which detectors' deviations are weighed by ``sqrt(n_tokens / median)``, a mean over a row's tokens
  having a sampling noise that falls as ``1/sqrt(n)`` (the default: ``garbled``'s, the detectors marked
  ``token_mean``; none, as before; ``mismatch``'s too; every detector's);
- **the default before** the mixtures below: ``cut`` on ``end_loss`` itself and no deviation weighed by length;
- **mechanisms** that need inputs valuegate does not extract (:mod:`tests.benchmarks.fault_mechanisms`: one
  forward pass per row, cached in ``<out>/faults-mechanisms-*.npz``; ``--no-mechanisms`` skips them): rows found
  alike by what was *asked* (the prompt's mean hidden state, or its last position's) instead of the answer's
  mean hidden state, which a fault of the answer moves; and the end of an answer counted at a line break too
  (and at a sentence stop), with a floor of log 2 on ``cut``'s spread (a factor of two in the end's
  probability).

A variant is *admissible* on a set when it drops at most 3% of a real set's clean rows (10% of the demo's) and, on
the DataInf zoo, has no lower recall at the threshold than the default. Leave-one-set-out: for each set, the
admissible variant (on the other sets) with the fewest missed cells on the other sets is chosen and scored on the
held-out set. Leave-one-fault-out: for each fault type, the variant admissible on every set with the fewest missed
cells of the other types is chosen and scored on that type's cells. Cells of fewer than 5 broken rows are not
counted. ``--draws``: the clean rows dropped at thresholds 3-4 when other clean rows (seeded draws of 40 and 100)
calibrate the detectors, the robustness behind ``select.suspect_threshold``'s default. ``--mixtures``: the real sets
as the tasks of one training set (60 clean rows and 3 of each corruption per task), its validation rows from every
task or all from one (a validation set that targets one task), for a few variants: the clean rows dropped at
thresholds 3-3.5, and ``suspect`` against the best one-line filter per fault. Prints the table per variant and the
choice per fold; writes ``<out>/faults-variants.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
import polars as pl
from scipy.stats import chi2, norm

from tests.benchmarks.bench_faults import REAL_SETS, auc, with_text_inputs
from tests.benchmarks.fault_mechanisms import mechanism_inputs
from valuegate.engine import faults as F

CODES = ["mismatch", "echo", "garbled", "cut"]
BASELINES = ("perplexity", "ifd", "rds_mean", "rds_max", "length")
Q = 0.9  # the default calibration quantile (faults.CALIBRATION_QUANTILE)
# the detectors whose deviations are weighed by sqrt(n_tokens / median) by default (Detector.token_mean)
TOKEN_MEAN = tuple(c for c in CODES if F.DETECTORS[c].token_mean)


def load(out: Path) -> tuple[dict, dict]:
    ref = {d["key"]: d for d in json.loads((out / "faults.json").read_text())["sets"]}
    sets = {}
    for key in ref:
        df = with_text_inputs(pl.read_parquet(out / f"faults-scores-{key}.parquet"))
        tr, va = df.filter(pl.col("role") == "train"), df.filter(pl.col("role") == "valid")
        names = [c[3:] for c in df.columns if c.startswith("in_")]

        def side(t: pl.DataFrame, names=names) -> tuple[dict, np.ndarray]:
            return ({n: t[f"in_{n}"].to_numpy().astype(np.float64) for n in names},
                    np.array(t["hidden"].to_list(), dtype=np.float64))

        (ti, th), (vi, vh) = side(tr), side(va)
        sets[key] = {"ti": ti, "th": th, "vi": vi, "vh": vh, "cor": tr["corruption"].fill_null("").to_numpy(),
                     # the one-line filters, each signed so that higher = dropped
                     "base": {"perplexity": tr["perplexity"].to_numpy().astype(np.float64),
                              "ifd": tr["ifd"].to_numpy().astype(np.float64),
                              "length": -tr["length"].to_numpy().astype(np.float64)}}
    return sets, ref


def with_mechanism(s: dict, likeness: str | None = None, end: str | None = None) -> dict:
    """The set ``s`` with its rows found alike by ``likeness`` (``prompt_mean``, ``prompt_last``, or ``both``: the
    prompt's mean and the answer's mean hidden state side by side) and its ``end_loss`` counting ``end`` (``break``:
    a line break ends an answer too; ``stop``: a line break or a sentence stop), from ``s["mech"]``."""
    if likeness is None and end is None:
        return s
    m = s["mech"]
    s = {**s, "ti": dict(s["ti"]), "vi": dict(s["vi"])}
    if likeness == "both":
        s["th"] = np.concatenate([m["train_prompt_mean"], s["th"]], 1)
        s["vh"] = np.concatenate([m["valid_prompt_mean"], s["vh"]], 1)
    elif likeness is not None:
        s["th"], s["vh"] = m[f"train_{likeness}"], m[f"valid_{likeness}"]
    if end is not None:
        for side, role in (("ti", "train"), ("vi", "valid")):
            lp = m[f"{role}_end"]
            closers = np.logaddexp(lp[:, 0], lp[:, 1])
            if end == "stop":
                closers = np.logaddexp(closers, lp[:, 2])
            s[side]["end_loss"] = np.where(np.isfinite(closers), -closers, s[side]["end_loss"])
    return s


def deviations(s: dict, loc: float | str | dict = 1.0, trim: float | None = None, k: int = 100,
               pool_size: int = 2000, length: tuple | None = None, floor: dict | None = None,
               transform: dict | None = None, local: bool = False) -> tuple[dict, np.ndarray]:
    """code → {"pool": the pool rows' leave-one-out deviations, "train": the training rows'}, and the trusted
    (validation) mask of the pool. ``loc``: the weight of the neighbours' median against the pool's median
    (1: the default), a rule name, or code → weight. ``transform``: code → a function applied to that detector's
    statistic before anything else (``cut: np.square`` gives ``end_loss`` back). ``local``: each deviation over the robust spread of its
    neighbours' own deviations (then calibrated as usual)."""
    ti, th, vi, vh = s["ti"], s["th"], s["vi"], s["vh"]
    n = len(th)
    pool = F.pool_sample(n, pool_size)
    pin = {c: np.concatenate([ti[c][pool], vi[c]]) for c in sorted(set(ti) & set(vi))}
    ph = np.concatenate([th[pool], vh])
    trusted = np.r_[np.zeros(len(pool), bool), np.ones(len(vh), bool)]
    centre = ph.mean(0)
    pu, tu = F._unit_rows(ph, centre), F._unit_rows(th, centre)
    ps, ts = F.statistics(pin, CODES), F.statistics(ti, CODES)
    for c, fn in (transform or {}).items():
        ps[c], ts[c] = fn(ps[c]), fn(ts[c])
    pool_pos = np.full(n, -1)
    pool_pos[pool] = np.arange(len(pool))
    keep = np.ones(len(ph), bool)
    for rnd in range(2 if trim else 1):
        idx = np.flatnonzero(keep)
        own = np.full(len(ph), -1)
        own[idx] = np.arange(len(idx))
        nbp = idx[F._neighbours(pu, pu[idx], k, own)]
        nbt = idx[F._neighbours(tu, pu[idx], k, np.where(pool_pos >= 0, own[np.maximum(pool_pos, 0)], -1))]
        out = {}
        length = TOKEN_MEAN if length is None else length
        for c in CODES:
            g = float(np.nanmedian(ps[c]))
            lp, lt = F._location(ps[c], nbp), F._location(ps[c], nbt)
            b = _weight(loc, c, ps[c][trusted] - g, lp[trusted] - g)
            out[c] = {"pool": ps[c] - (g + b * (lp - g)), "train": ts[c] - (g + b * (lt - g))}
            if local:
                dp = out[c]["pool"]
                for part, nbx in (("pool", nbp), ("train", nbt)):
                    out[c][part] = out[c][part] / np.maximum(_local_spread(dp, nbx), max(_floor(c, floor), 1e-9))
            if c in length:  # a mean over n tokens: its noise falls as 1/sqrt(n)
                n_med = float(np.median(pin["n_tokens"]))
                out[c]["pool"] = out[c]["pool"] * np.sqrt(np.maximum(pin["n_tokens"], 1) / n_med)
                out[c]["train"] = out[c]["train"] * np.sqrt(np.maximum(ti["n_tokens"], 1) / n_med)
        if trim and rnd == 0:
            zmax = np.zeros(len(ph))
            for c in CODES:
                off, sc, tail = _calibration(out[c]["pool"][trusted], c, floor=floor)
                zmax = np.maximum(zmax, np.nan_to_num((out[c]["pool"] - off) / sc / tail, nan=0.0))
            keep = trusted | (zmax <= trim)
    return out, trusted


def _local_spread(dev: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """``(n,)`` 1.4826 · the median absolute deviation of each row's neighbours' deviations (NaN-aware)."""
    vals = dev[nb]
    med = np.nanmedian(vals, axis=1, keepdims=True)
    return 1.4826 * np.nanmedian(np.abs(vals - med), axis=1)


def _weight(loc, code: str, y: np.ndarray, x: np.ndarray) -> float:
    if isinstance(loc, dict):
        return float(loc.get(code, 1.0))
    if not isinstance(loc, str):
        return float(loc)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if loc == "beta":
        return float(np.clip((x * y).sum() / max((x * x).sum(), 1e-12), 0, 1))
    if loc == "choose":
        return 1.0 if F._spread(y - x) < F._spread(y) else 0.0
    slopes = [(y[i] - y[j]) / (x[i] - x[j]) for i in range(len(x)) for j in range(i) if abs(x[i] - x[j]) > 1e-9]
    return float(np.clip(np.median(slopes), 0, 1)) if slopes else 0.0  # theil


def _floor(code: str, floor: dict | None) -> float:
    return (floor or {}).get(code, F.DETECTORS[code].min_spread)


def _calibration(dev: np.ndarray, code: str, q: float = Q, floor: dict | None = None) -> tuple[float, float, float]:
    """(offset, spread, tail) as FaultReference.build reads them from clean deviations (``floor``: code → a
    ``min_spread`` other than the detector's)."""
    dev = dev[np.isfinite(dev)]
    off = float(np.median(dev))
    sc = max(F._spread(dev - off), _floor(code, floor)) if code else F._spread(dev - off)
    z = (dev - off) / sc
    return off, sc, max(1.0, float(np.quantile(z, q)) / NormalDist().inv_cdf(q))


def calibrated(d: dict, trusted: np.ndarray, cal: tuple | None, floor: dict | None = None) -> tuple[dict, dict]:
    """code → calibrated training-row scores and validation-row scores (unclipped)."""
    zt, zv = {}, {}
    for c in CODES:
        v = d[c]["pool"][trusted]
        if cal is None:
            off, sc, tail = _calibration(v, c, floor=floor)
        else:
            base, p = cal
            allp = d[c]["pool"] if base == "pool" else v
            allp = allp[np.isfinite(allp)]
            off = float(np.median(v[np.isfinite(v)]))
            if p < 0.85:  # an upper semi-quantile spread, no tail factor
                sc = max((np.quantile(allp, p) - off) / NormalDist().inv_cdf(p), _floor(c, floor), 1e-9)
                tail = 1.0
            else:
                _, sc, tail = _calibration(allp - np.median(allp) + off, c, p, floor)
        zt[c], zv[c] = (d[c]["train"] - off) / sc / tail, (v - off) / sc / tail
    return zt, zv


def _pos(z: dict) -> np.ndarray:
    return np.stack([np.nan_to_num(np.maximum(z[c], 0), nan=0.0) for c in CODES], 1)


def _full(z: dict) -> np.ndarray:
    return np.stack([np.nan_to_num(z[c], nan=0.0) for c in CODES], 1)


COMBINE = {
    "sum": lambda z: _pos(z).sum(1),
    "rss": lambda z: np.sqrt((_pos(z) ** 2).sum(1)),
    "top2": lambda z: np.sort(_pos(z), 1)[:, -2:].sum(1),
    "softmax": lambda z: (lambda m: m.max(1) + 0.5 * np.log(np.exp((m - m.max(1, keepdims=True)) / 0.5).sum(1)))(_pos(z)),
    "fisher": lambda z: norm.isf(chi2.sf(-2 * np.log(norm.sf(_full(z))).sum(1), 2 * len(CODES))),
    "bonferroni": lambda z: norm.isf(np.minimum(1.0, norm.sf(_full(z)).min(1) * len(CODES))),
}


def suspect(s: dict, loc=1.0, trim=None, cal=None, combine=None, length=None, likeness=None, end=None,
            floor=None, transform=None, k=100, local=False) -> np.ndarray:
    d, trusted = deviations(with_mechanism(s, likeness, end), loc, trim, k=k, length=length, floor=floor,
                            transform=transform, local=local)
    zt, zv = calibrated(d, trusted, cal, floor)
    if combine is None:
        return _pos(zt).max(1)
    f = COMBINE[combine]
    off, sc, tail = _calibration(f(zv), "")
    return (f(zt) - off) / sc / tail


VARIANTS: dict[str, dict] = {
    "default (largest calibrated score)": {},
    **{f"combine: {c}": {"combine": c} for c in COMBINE},
    **{f"location: {m}": {"loc": m} for m in ("beta", "theil", "choose")},
    **{f"location: neighbours weight {b}": {"loc": b} for b in (0.0, 0.25, 0.5, 0.75)},
    **{f"location: garbled weight {b}": {"loc": {"garbled": b}} for b in (0.0, 0.25, 0.5, 0.75)},
    **{f"trim pool rows above {t}": {"trim": t} for t in (1.5, 2.0, 3.0)},
    "scale: pool upper quartile": {"cal": ("pool", 0.75)},
    "scale: pool, tail q0.9": {"cal": ("pool", 0.9)},
    "scale: validation upper quartile": {"cal": ("valid", 0.75)},
    "length: garbled, mismatch deviations times sqrt(n / median n)": {"length": ("garbled", "mismatch")},
    "length: no deviation weighed": {"length": ()},
    "length: every detector": {"length": tuple(CODES)},
    **{f"neighbours: k = {k}": {"k": k} for k in (25, 50, 200)},
    # the default ``cut`` reads sqrt(end_loss); its square gives end_loss back
    "tail: cut reads end_loss in nats": {"transform": {"cut": np.square}},
    "tail: cut reads log(1 + end_loss)": {"transform": {"cut": lambda x: np.log1p(np.square(x))}},
    "tail: cut reads log(0.1 + end_loss)": {"transform": {"cut": lambda x: np.log(np.square(x) + 0.1)}},
    "spread: each row's neighbours' own": {"local": True},
    # the default before the mixtures: cut on end_loss itself, no deviation weighed by length
    "the default before (cut in nats, no length weight)": {"transform": {"cut": np.square}, "length": ()},
}
# the variants the mixtures of real sets are scored with (--mixtures)
MIXTURE_VARIANTS = ("default (largest calibrated score)", "the default before (cut in nats, no length weight)",
                    "tail: cut reads end_loss in nats", "tail: cut reads log(1 + end_loss)",
                    "length: no deviation weighed", "spread: each row's neighbours' own",
                    "neighbours: k = 25", "neighbours: k = 50")

LOG2 = {"cut": float(np.log(2.0))}
# the variants that read tests/benchmarks/fault_mechanisms.py's inputs (a forward pass per row, cached)
MECHANISMS: dict[str, dict] = {
    "likeness: the prompt's mean hidden state": {"likeness": "prompt_mean"},
    "likeness: the prompt's last position": {"likeness": "prompt_last"},
    "likeness: prompt and answer side by side": {"likeness": "both"},
    "end: a line break ends an answer": {"end": "break"},
    "end: a line break ends an answer, cut floor log 2": {"end": "break", "floor": LOG2},
    "end: a line break or a sentence stop ends an answer, cut floor log 2": {"end": "stop", "floor": LOG2},
    "prompt's mean likeness and a line break ends an answer, cut floor log 2": {
        "likeness": "prompt_mean", "end": "break", "floor": LOG2},
}


def evaluate(sus: np.ndarray, s: dict, ref: dict, threshold: float) -> dict:
    cor = s["cor"]
    clean = cor == ""
    out = {"drop": float((sus[clean] > threshold).mean()), "recall": float((sus[~clean] > threshold).mean()),
           "missed": []}
    for r in ref["rows"]:
        if r["n"] < 5 or not r["perceivable"]:
            continue
        m = clean | (cor == r["corruption"])
        a = auc(sus[m], cor[m] == r["corruption"])
        best_any = max(r["best_signal_auc"], *[max(r[b], 1 - r[b]) for b in BASELINES if np.isfinite(r[b])])
        if not (a >= r["best_baseline_auc"] - 0.02 and (a >= 0.95 or best_any < 0.95)):
            out["missed"].append(f"{r['corruption']} {a:.3f}")
    return out


def redrawn(s: dict, m: int, seed: int) -> dict:
    """The set ``s`` with ``m`` of its clean training rows (seeded draw) as the validation rows instead of its own,
    and the rest as its training rows."""
    clean = np.flatnonzero(s["cor"] == "")
    pick = np.random.default_rng(seed).choice(clean, m, replace=False)
    keep = np.setdiff1d(np.arange(len(s["cor"])), pick)
    return {"ti": {c: v[keep] for c, v in s["ti"].items()}, "th": s["th"][keep], "cor": s["cor"][keep],
            "vi": {c: s["ti"][c][pick] for c in s["ti"]}, "vh": s["th"][pick]}


def validation_draws(sets: dict, draws: int, sizes=(40, 100), thresholds=(3.0, 3.25, 3.5, 4.0)) -> list[dict]:
    """How much the clean rows dropped at a threshold depend on which clean rows calibrate it: per validation
    size and threshold, over ``draws`` seeded draws of the validation rows from each set's clean training rows
    (the demo, which has no spare clean rows, is left out), the share of (set, draw) runs dropping more than 3% of
    the clean rows, the largest such share, and the mean recall."""
    out = []
    for m in sizes:
        runs = [(t["cor"], suspect(t)) for k, s in sets.items() if k != "demo" and (s["cor"] == "").sum() >= m + 100
                for t in (redrawn(s, m, seed) for seed in range(draws))]
        for th in thresholds:
            drop, rec = [], []
            for cor, sus in runs:
                drop.append(float((sus[cor == ""] > th).mean()))
                rec.append(float((sus[cor != ""] > th).mean()))
            out.append({"validation_rows": m, "threshold": th, "runs": len(runs),
                        "over_3pct": float(np.mean(np.array(drop) > 0.03)), "max_drop": max(drop),
                        "median_drop": float(np.median(drop)), "mean_recall": float(np.mean(rec))})
            print(f"validation rows {m}, threshold {th:g}: {out[-1]['over_3pct']:.1%} of {len(runs)} runs drop over "
                  f"3% of the clean rows (median {out[-1]['median_drop']:.1%}, largest {max(drop):.1%}); mean "
                  f"recall {out[-1]['mean_recall']:.1%}")
    return out


def mixture(sets: dict, keys: list[str], seed: int, only: int | None, clean: int = 60, per_type: int = 3,
            valid: int = 8) -> dict:
    """One training set of several tasks: from each set of ``keys`` (a task), ``clean`` clean rows and ``per_type``
    rows of each corruption (seeded draw); the validation rows ``valid`` of each task's own, or when ``only`` is a
    task's index, 40 of that task's alone (a validation set that targets one task of the training data). ``task``:
    each training row's task index."""
    rng = np.random.default_rng([seed, 0 if only is None else only + 1])
    parts, vparts = [], []
    for j, key in enumerate(keys):
        s = sets[key]
        pick = list(rng.choice(np.flatnonzero(s["cor"] == ""), clean, replace=False))
        for kind in sorted(set(s["cor"]) - {""}):
            rows = np.flatnonzero(s["cor"] == kind)
            pick += list(rng.choice(rows, min(per_type, len(rows)), replace=False))
        parts.append((j, np.sort(np.array(pick))))
        n_v = valid if only is None else (40 if j == only else 0)
        if n_v:
            vparts.append(np.sort(rng.choice(len(s["vh"]), min(n_v, len(s["vh"])), replace=False)))
        else:
            vparts.append(np.array([], dtype=np.int64))

    def cat(field: str, sub: str | None = None, valid_side: bool = False) -> np.ndarray:
        return np.concatenate([(sets[keys[j]][field] if sub is None else sets[keys[j]][field][sub])[
            vparts[j] if valid_side else idx] for j, idx in parts])

    names = sorted(set.intersection(*[set(sets[k]["ti"]) for k in keys]))
    return {"ti": {c: cat("ti", c) for c in names}, "th": cat("th"), "cor": cat("cor"),
            "vi": {c: cat("vi", c, True) for c in names}, "vh": cat("vh", None, True),
            "base": {b: cat("base", b) for b in sets[keys[0]]["base"]},
            "task": np.concatenate([np.full(len(idx), j) for j, idx in parts])}


def mixtures(sets: dict, variants: dict, seeds: int = 3, thresholds=(3.0, 3.25, 3.5)) -> dict:
    """The real sets as the tasks of one training set (:func:`mixture`), with validation rows of every task or of
    one: per variant and threshold, the share of mixtures dropping over 3% of the clean rows, the largest drop and
    the mean recall; per fault, the mean of ``suspect``'s AUC less the best one-line filter's (perplexity, IFD,
    length: RDS depends on the validation rows and is not cached per row)."""
    keys = [k for k in sets if k.split("-")[0] in REAL_SETS and k.endswith("-s0")]
    mixes = [mixture(sets, keys, seed, only) for only in [None, *range(len(keys))] for seed in range(seeds)]
    out = {}
    for v, kw in variants.items():
        runs = [(m, suspect(m, **kw)) for m in mixes]
        res = {"thresholds": {}, "vs_best_filter": {}}
        for th in thresholds:
            drops = [float((sus[m["cor"] == ""] > th).mean()) for m, sus in runs]
            res["thresholds"][th] = {"over_3pct": float(np.mean(np.array(drops) > 0.03)), "max_drop": max(drops),
                                     "mean_recall": float(np.mean([(sus[m["cor"] != ""] > th).mean() for m, sus in runs]))}
        for kind in sorted(set(mixes[0]["cor"]) - {""}):
            diffs = []
            for m, sus in runs:
                sel = (m["cor"] == "") | (m["cor"] == kind)
                lab = m["cor"][sel] == kind
                diffs.append(auc(sus[sel], lab) - max(auc(b[sel], lab) for b in m["base"].values()))
            res["vs_best_filter"][kind] = float(np.mean(diffs))
        out[v] = res
        cells = " | ".join(f"{r['over_3pct']:.0%} / {r['max_drop']:.1%} / {r['mean_recall']:.0%}"
                           for r in res["thresholds"].values())
        print(f"mixtures, {v}: over 3% / largest drop / recall at {', '.join(map(str, thresholds))}: {cells}; "
              "suspect - best filter: " + ", ".join(f"{k} {d:+.2f}" for k, d in res["vs_best_filter"].items()),
              flush=True)
    return {"tasks": keys, "mixtures": len(mixes), "variants": out}


def main() -> None:
    from valuegate.settings import load_settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--draws", type=int, default=12, help="seeded draws of the validation rows per set and size "
                    "for the threshold's robustness (0: skip)")
    ap.add_argument("--mixtures", type=int, default=3, help="seeds of the mixtures of the real sets (0: skip)")
    ap.add_argument("--no-mechanisms", action="store_true",
                    help="skip the variants that need a forward pass per row (fault_mechanisms)")
    a = ap.parse_args()
    threshold = load_settings(None, {}).select.suspect_threshold
    sets, ref = load(a.out)
    variants = dict(VARIANTS)
    if not a.no_mechanisms:
        for key, s in sets.items():
            s["mech"] = mechanism_inputs(key, a.out)
        variants.update(MECHANISMS)
    res = {v: {k: evaluate(suspect(s, **kw), s, ref[k], threshold) for k, s in sets.items()}
           for v, kw in variants.items()}
    default = next(iter(variants))

    def admissible(v: str, k: str) -> bool:
        r = res[v][k]
        if r["drop"] > (0.10 if k == "demo" else 0.03):
            return False
        return not (k.startswith(("grammars", "math")) and r["recall"] < res[default][k]["recall"] - 1e-9)

    short = {k: k.split("-")[0] for k in sets}
    print("variant | missed | " + " | ".join(f"{short[k]} missed/clean dropped/recall" for k in sets))
    for v in variants:
        cells = [f"{len(res[v][k]['missed'])}/{res[v][k]['drop']:.1%}/{res[v][k]['recall']:.0%}"
                 + ("" if admissible(v, k) else " (not admissible)") for k in sets]
        print(f"{v} | {sum(len(res[v][k]['missed']) for k in sets)} | " + " | ".join(cells))
    folds = []
    for held in sets:
        rest = [k for k in sets if k != held]
        ok = [v for v in variants if all(admissible(v, k) for k in rest)]
        chosen = min(ok, key=lambda v: (sum(len(res[v][k]["missed"]) for k in rest), list(variants).index(v)))
        r = res[chosen][held]
        folds.append({"held_out": held, "chosen": chosen, "missed": r["missed"], "drop": r["drop"],
                      "recall": r["recall"], "admissible": admissible(chosen, held),
                      "default_missed": res[default][held]["missed"]})
        print(f"held out {short[held]}: chosen {chosen!r}; held-out missed {r['missed']} (default "
              f"{res[default][held]['missed']}), clean dropped {r['drop']:.1%}, recall {r['recall']:.1%}"
              f"{'' if admissible(chosen, held) else ', not admissible there'}")
    fault_folds = []
    kinds = sorted({m.split()[0] for v in variants for k in sets for m in res[v][k]["missed"]}
                   | {r["corruption"] for k in sets for r in ref[k]["rows"] if r["perceivable"] and r["n"] >= 5})

    def missed_of(v: str, kind: str, keep: bool) -> int:
        """Missed cells of ``kind`` (``keep``) or of every other kind (not ``keep``), over every set."""
        return sum((m.split()[0] == kind) == keep for k in sets for m in res[v][k]["missed"])

    ok = [v for v in variants if all(admissible(v, k) for k in sets)]
    for kind in kinds:
        chosen = min(ok, key=lambda v: (missed_of(v, kind, False), list(variants).index(v)))
        fault_folds.append({"held_out": kind, "chosen": chosen, "missed": missed_of(chosen, kind, True),
                            "default_missed": missed_of(default, kind, True)})
        print(f"held out fault {kind}: chosen {chosen!r}; its missed cells {missed_of(chosen, kind, True)} "
              f"(default {missed_of(default, kind, True)})")
    draws = validation_draws(sets, a.draws) if a.draws else []
    mixed = mixtures(sets, {v: VARIANTS[v] for v in MIXTURE_VARIANTS}, a.mixtures) if a.mixtures else {}
    (a.out / "faults-variants.json").write_text(json.dumps({"variants": res, "folds": folds, "fault_folds": fault_folds,
                                                             "draws": draws, "mixtures": mixed}, indent=1))


if __name__ == "__main__":
    main()
