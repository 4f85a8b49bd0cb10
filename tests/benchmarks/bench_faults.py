"""Do the fault detectors name the fault, and beat the one-line filters, on data nobody tuned on? (issue 27)

    .venv/bin/python -m tests.benchmarks.bench_faults [--sets gsm8k,piqa,cosmosqa,quartz,ropes,demo,grammars,math_without_reason]
        [--clean 500] [--per-type 25] [--valid 60] [--seed 0] [--out bench-results] [--data DIR]

Every number comes from valuegate's own API (``valuegate.score(train, valid)``, default settings, the default
model), so it is what a user gets. Scored tables (the detectors' per-row inputs and hidden states with them) are
cached in ``<out>/faults-scores-<set>-v<valid>-c<clean>-p<per-type>-s<seed>.parquet`` (the demo's:
``faults-scores-demo.parquet``); the verdict is recomputed from them by the current detector code on every run,
so a change to the detectors or their calibration needs no forward pass. Delete a cached table after a change to
the extraction.

**Sets.** Real, human-written instruction data checked in under ``tests/benchmarks/data/real/`` (GSM8K worked
answers; PIQA solutions, CosmosQA answers, QuaRTz explanations and ROPES situations from Super-NaturalInstructions,
the last two never tuned on; its README says where each comes from), the DataInf sets (``--data``, default
``../shared/data/datainf``) and the demo. Per real or DataInf set: ``--valid`` clean rows are the validation set,
``--clean`` other rows the clean training rows, and from yet other rows the corruption zoo
(:mod:`tests.benchmarks.zoo`, ``--per-type`` per generator; the generators keep every newline, so no corruption
leaves a formatting tell). The demo is scored as shipped (its ``corruption`` column).

**Reported** per set and corruption type: the ROC AUC of flagging the corrupted rows against the clean training
rows for ``suspect``, each detector's score, ``value`` (low), every baseline in the direction its filter drops
(perplexity high, IFD high, RDS mean/max low, length short) and the best single signal or baseline on either
side (a type is *perceivable* when that reaches 0.75); how often ``fault`` names the detector meant for the
type; the clean rows dropped and the recall at the default threshold; and for each real set the 20 clean rows
of highest ``suspect`` with their fault and reason, written to ``<out>/faults-top-clean-<set>.md`` to be read
by a person.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from tests.benchmarks.bench_engine import DEFAULT_DATA, machine
from tests.benchmarks.tables import table
from tests.benchmarks.zoo import GENERATORS, corrupt_rows

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "benchmarks" / "data" / "real"
DEMO = ROOT / "infra" / "demo" / "data"
REAL_SETS = ("gsm8k", "piqa", "cosmosqa", "quartz", "ropes")
DATAINF_SETS = {"grammars": "variation", "math_without_reason": "variation"}
KINDS = list(GENERATORS)
PERCEIVABLE = 0.75
BASELINE_SIDES = {"perplexity": 1, "ifd": 1, "rds_mean": -1, "rds_max": -1, "length": -1}
# the detector meant for each corruption of the zoo (the demo's: swap, copy, wrong)
MEANT = {"copy": "echo", "swap": "mismatch", "truncate": "cut", "shuffle": "garbled", "junk": "garbled",
         "delete": "cut", "wrong": None}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_set(name: str, a) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(train frame with a corruption column, validation frame)`` of one set."""
    if name == "demo":
        train, valid = read_jsonl(DEMO / "train.jsonl"), read_jsonl(DEMO / "valid.jsonl")
        train = [{"prompt": r["prompt"], "response": r["response"], "corruption": r.get("corruption") or ""}
                 for r in train]
        return pl.DataFrame(train), pl.DataFrame([{"prompt": r["prompt"], "response": r["response"]} for r in valid])
    if name in REAL_SETS:
        rows = fitting(read_jsonl(REAL / f"{name}.jsonl"), name)
        for i, r in enumerate(rows):
            r["cls"] = str(i)  # every row its own class: a swap takes any other row's answer
        cls = "cls"
    else:
        rows = read_jsonl(a.data / f"{name}_train.jsonl")
        cls = DATAINF_SETS[name]
    order = np.random.default_rng([a.seed, 0]).permutation(len(rows))
    valid = [rows[i] for i in order[:a.valid]]
    clean = [{**rows[i], "corruption": ""} for i in order[a.valid:a.valid + a.clean]]
    pool = [int(i) for i in order[a.valid + a.clean:]]
    bad = corrupt_rows(rows, KINDS, a.per_type, a.seed, cls, pool=pool)
    keep = ("prompt", "response", "corruption")
    return (pl.DataFrame([{k: r[k] for k in keep} for r in clean + bad]),
            pl.DataFrame([{"prompt": r["prompt"], "response": r["response"]} for r in valid]))


def fitting(rows: list[dict], name: str) -> list[dict]:
    """The rows whose prompt and response fit ``extract.max_length`` tokens at the default settings, with room
    for the chat template (ROPES' background paragraphs can fill it, and valuegate refuses a row none of whose
    answer it can read); how many were left out is printed."""
    from valuegate.api import resolve_settings
    from valuegate.engine.model import load_tokenizer

    s = resolve_settings(None, None, {})
    tok = load_tokenizer(s.model)
    room = s.extract.max_length - 32
    keep = [r for r in rows if len(tok(r["prompt"] + "\n" + r["response"])["input_ids"]) <= room]
    if len(keep) < len(rows):
        print(f"{name}: {len(rows) - len(keep)} of {len(rows)} rows left out, longer than {room} tokens", flush=True)
    return keep


def set_key(name: str, a) -> str:
    """The name a set's cached table and top-clean file carry: the set and what built it (``gsm8k-v30-c250-p12-s0``;
    the demo, scored as shipped, ``demo``)."""
    return name if name == "demo" else f"{name}-v{a.valid}-c{a.clean}-p{a.per_type}-s{a.seed}"


def scored(name: str, train: pl.DataFrame, valid: pl.DataFrame, a) -> pl.DataFrame:
    """``valuegate.score(train, valid)`` at the defaults (the API's own path), cached with the fault detectors'
    per-row inputs and hidden states, so that the verdict (:func:`with_verdict`) can be recomputed by the
    current detector code without another forward pass."""
    from valuegate.api import resolve_settings, score_inputs

    path = a.out / f"faults-scores-{set_key(name, a)}.parquet"
    if path.exists():
        return with_text_inputs(pl.read_parquet(path))
    t0 = time.perf_counter()
    out, vm = score_inputs(train, valid, resolve_settings(None, None, {}), False)
    secs = time.perf_counter() - t0
    n, n_v = out.height, valid.height
    extra = {f"in_{k}": np.asarray(v, dtype=np.float64) for k, v in vm.train_inputs.items()}
    extra["hidden"] = [list(map(float, h)) for h in vm.train_hidden]
    vextra = {f"in_{k}": np.asarray(v, dtype=np.float64) for k, v in vm.valid_inputs.items()}
    vextra["hidden"] = [list(map(float, h)) for h in vm.valid_hidden]
    frame = pl.concat([out.with_columns(pl.lit("train").alias("role"), *[pl.Series(k, v) for k, v in extra.items()]),
                       pl.DataFrame({"prompt": valid["prompt"], "response": valid["response"],
                                     "role": ["valid"] * n_v, **vextra})], how="diagonal_relaxed")
    a.out.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    print(f"scored {name}: {n} rows against {n_v} in {secs:.0f}s", flush=True)
    return frame


def with_text_inputs(df: pl.DataFrame) -> pl.DataFrame:
    """The cached rows with the inputs that need no forward pass (``prompt_overlap``: tokens only) recomputed
    by the current code, as valuegate renders and tokenizes the rows at the default settings."""
    from valuegate.api import resolve_settings
    from valuegate.engine.ending import prompt_overlap
    from valuegate.engine.model import encode_sample, load_tokenizer
    from valuegate.engine.sample import Sample

    s = resolve_settings(None, None, {})
    tok = load_tokenizer(s.model)
    ex = s.extract
    overlap = []
    for i, (p, r) in enumerate(zip(df["prompt"].to_list(), df["response"].to_list(), strict=True)):
        e = encode_sample(tok, Sample(kind="prompt_response", row=i, source="bench", prompt=p, response=r),
                          ex.loss_on, ex.max_length, ex.truncation, ex.template)
        overlap.append(prompt_overlap(e.input_ids, e.counted))
    return df.with_columns(pl.Series("in_prompt_overlap", overlap, dtype=pl.Float64))


def with_verdict(df: pl.DataFrame) -> pl.DataFrame:
    """The training rows with ``suspect``, ``fault``, ``suspect_reason`` and ``fault_<code>`` recomputed from the
    cached inputs by the current detector code (:func:`valuegate.engine.faults.verdict`, what ``valuegate.score``
    runs) at the default settings."""
    from valuegate.engine.faults import fault_columns, verdict
    from valuegate.settings import load_settings

    sc = load_settings(None, {}).score
    tr, va = df.filter(pl.col("role") == "train"), df.filter(pl.col("role") == "valid")
    names = [c[3:] for c in df.columns if c.startswith("in_")]

    def side(t: pl.DataFrame) -> tuple[dict, np.ndarray]:
        return ({k: t[f"in_{k}"].to_numpy().astype(np.float64) for k in names},
                np.array(t["hidden"].to_list(), dtype=np.float64))

    (ti, th), (vi, vh) = side(tr), side(va)
    v = verdict(ti, th, vi, vh, list(sc.suspect), sc.suspect_neighbours, sc.fault_pool)
    cols = fault_columns(v, tr.height)
    return tr.with_columns(*[pl.Series(k, c, dtype=pl.Float64 if k not in ("fault", "suspect_reason") else pl.String)
                             for k, c in cols.items()])


def auc(score: np.ndarray, label: np.ndarray) -> float:
    from valuegate.engine.detection import detection_auc

    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-1e300)
    label = np.asarray(label, dtype=bool)
    return detection_auc(score, label) if 0 < label.sum() < label.size else float("nan")


def detection(name: str, df: pl.DataFrame, threshold: float) -> dict:
    """Per corruption type: every method's AUC, the fault named, recall; the clean rows dropped."""
    from valuegate.engine.columns import FAULT_CODES, FAULT_SCORE_COLUMNS, SIGNAL_COLUMNS

    cor = df["corruption"].fill_null("").to_numpy()
    clean = cor == ""
    kinds = [k for k in KINDS if (cor == k).any()] + sorted({k for k in cor if k and k not in KINDS})
    sus = df["suspect"].fill_null(float("inf")).to_numpy()
    fault = df["fault"].fill_null("").to_numpy()
    det = {c: df[col].cast(pl.Float64).fill_null(0.0).to_numpy() for c, col in zip(FAULT_CODES, FAULT_SCORE_COLUMNS,
                                                                                   strict=True)}
    base = {b: s * df[b].cast(pl.Float64).fill_null(float("nan")).to_numpy() for b, s in BASELINE_SIDES.items()}
    sig = {s: df[s].cast(pl.Float64).to_numpy() for s in SIGNAL_COLUMNS if s in df.columns}
    sig["mean_loss"] = df["mean_loss"].to_numpy()
    rows = []
    for k in kinds:
        m = clean | (cor == k)
        lab = cor[m] == k
        r = {"set": name, "corruption": k, "n": int(lab.sum()), "suspect": auc(sus[m], lab),
             "value": auc(-df["value"].to_numpy()[m], lab)}
        r.update({c: auc(x[m], lab) for c, x in det.items()})
        r.update({b: auc(x[m], lab) for b, x in base.items()})
        sides = {s: auc(x[m], lab) for s, x in sig.items()}
        best_sig = max(sides, key=lambda s: max(sides[s], 1 - sides[s]))
        r["best_signal"] = f"{best_sig}:{'high' if sides[best_sig] >= 0.5 else 'low'}"
        r["best_signal_auc"] = max(sides[best_sig], 1 - sides[best_sig])
        bb = max(BASELINE_SIDES, key=lambda b: np.nan_to_num(r[b], nan=0.0))
        r["best_baseline"], r["best_baseline_auc"] = bb, r[bb]
        both = [max(r[b], 1 - r[b]) for b in BASELINE_SIDES if np.isfinite(r[b])]
        r["perceivable"] = bool(max(r["best_signal_auc"], *both) >= PERCEIVABLE)
        flagged = sus[m][lab] > threshold
        r["recall"] = float(flagged.mean())
        meant = MEANT.get(k)
        r["named_right"] = (float((fault[m][lab][flagged] == meant).mean()) if meant and flagged.any()
                            else float("nan"))
        r["target_met"] = (not r["perceivable"] or (r["suspect"] >= r["best_baseline_auc"] - 0.02
                           and (r["suspect"] >= 0.95 or max(r["best_signal_auc"], *both) < 0.95)))
        rows.append(r)
    return {"set": name, "rows": rows, "n_clean": int(clean.sum()),
            "clean_dropped": float((sus[clean] > threshold).mean()),
            "clean_dropped_by_fault": {c: int(((sus > threshold) & clean & (fault == c)).sum()) for c in FAULT_CODES},
            "recall": float((sus[~clean] > threshold).mean()) if (~clean).any() else float("nan")}


def top_clean(name: str, df: pl.DataFrame, out: Path, n: int = 20) -> list[dict]:
    """The ``n`` clean rows of highest ``suspect``, with their fault and reason, as a Markdown file to read
    (``name``: the set's key, :func:`set_key`)."""
    top = (df.filter(pl.col("corruption").fill_null("") == "").sort("suspect", descending=True).head(n)
           .select("suspect", "fault", "suspect_reason", "prompt", "response").to_dicts())
    lines = [f"# {name}: the {n} clean rows of highest suspect\n"]
    for i, r in enumerate(top, 1):
        prompt = r["prompt"][-300:].replace("\n", " ")
        lines += [f"## {i}. suspect {r['suspect']:.2f}, {r['fault']}: {r['suspect_reason']}\n",
                  f"- prompt (end): {prompt}", f"- response: {r['response'][:600]}\n"]
    (out / f"faults-top-clean-{name}.md").write_text("\n".join(lines))
    return top


def write_json(path: Path, res: dict) -> None:
    """Write this run's sets into ``path``, keeping the sets an earlier run wrote there under other keys (one
    file for runs with different sizes per set)."""
    keys = {d["key"] for d in res["sets"]}
    old = json.loads(path.read_text()).get("sets", []) if path.exists() else []
    merged = {**res, "sets": [d for d in old if d.get("key") not in keys] + res["sets"]}
    path.write_text(json.dumps(merged, indent=1, default=float))


def main() -> None:
    from valuegate.settings import load_settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="gsm8k,piqa,cosmosqa,quartz,ropes,demo,grammars,math_without_reason")
    ap.add_argument("--clean", type=int, default=500)
    ap.add_argument("--per-type", type=int, default=25)
    ap.add_argument("--valid", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    threshold = load_settings(None, {}).select.suspect_threshold
    res = {"machine": machine(), "threshold": threshold, "sets": []}
    for name in a.sets.split(","):
        train, valid = build_set(name, a)
        df = with_verdict(scored(name, train, valid, a))
        d = detection(name, df, threshold)
        if name in REAL_SETS:
            d["top_clean"] = [{k: r[k] for k in ("suspect", "fault", "suspect_reason")} for r in top_clean(set_key(name, a), df, a.out)]
        d["key"] = set_key(name, a)
        res["sets"].append(d)
        cols = ["corruption", "n", "perceivable", "suspect", "mismatch", "echo", "garbled", "cut", "value",
                *BASELINE_SIDES, "best_baseline_auc", "best_signal", "best_signal_auc", "recall", "named_right",
                "target_met"]
        print(table(d["rows"], cols, f"\n{name} ({d['n_clean']} clean rows): clean dropped {d['clean_dropped']:.1%} "
                    f"{d['clean_dropped_by_fault']}, recall {d['recall']:.1%} at suspect > {threshold:g}"), flush=True)
        write_json(a.out / "faults.json", res)


if __name__ == "__main__":
    main()
