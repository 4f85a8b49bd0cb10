"""valuegate against the cheap filters a user would pick instead: perplexity, IFD, RDS+ similarity, length.

    .venv/bin/python -m tests.benchmarks.bench_baselines [--parts cost,selection] [--clean 500]
        [--per-type 25] [--calib-per-type 25] [--steps 60] [--seeds 0,1,2] [--conditions ...]
        [--selection-sets demo,math_without_reason] [--out bench-results] [--data DIR]

One run, one table per question (issue 18); every number comes from valuegate's own API
(``valuegate.score(train, valid)``, default settings, the default model SmolLM2-135M-Instruct), so it is what
a user gets. Scored tables are cached in ``<out>/baselines-scores-<set>.parquet`` (delete them to rescore).

**Detection** (which rows are broken, and whether the fault is named) is :mod:`tests.benchmarks.bench_faults`.
The zoo (:mod:`tests.benchmarks.zoo`) per DataInf set (``--data``, default ``../shared/data/datainf``):
``--clean`` untouched training rows and ``--per-type`` rows per generator; the validation file is split in two
seeded halves, the *reference* half being the validation set the math zoo is scored against.

**Cost.** Seconds per 1,000 training samples (the math zoo's rows), side by side in one process, one torch
thread: tokenising (length), a bare forward pass (final hidden states), the loss (perplexity: forward + the
LM head at the response positions), For-Value feature extraction, IFD's extra unconditional pass, and RDS
(a forward pass for the pooled states, then the cosines to 100 validation vectors). Each is the faster of two
repeats (the machine is shared); model load excluded.

**Selection pays.** LoRA fine-tunes of the default model (:mod:`tests.benchmarks.bench_selection`'s
``finetune`` and ``evaluate``) at an equal kept budget k = what valuegate's default policy keeps
(``select.policy = "suspect"``, threshold 2): ``valuegate`` vs each baseline policy's k rows
(``select_samples`` with ``fraction = k / n``; IFD keeps only rows with IFD < 1, possibly fewer) vs
``random`` (k rows, seeded per seed) vs ``full``; validation loss and exact match on the whole validation
file, per seed, on the demo (scored against its whole validation set) and on the math zoo (scored against
its reference half). Runs are ordered seed by seed and written to ``<out>/baselines-selection.json`` after
each, so a run stopped early leaves complete seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl

from tests.benchmarks.bench_engine import DEFAULT_DATA, machine, peak_rss_mb
from tests.benchmarks.tables import table
from tests.benchmarks.zoo import GENERATORS, corrupt_rows
from valuegate.settings import SelectSettings

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "infra" / "demo" / "data"
SETS = {"grammars": "variation", "math_without_reason": "variation", "demo": "family"}
KINDS = list(GENERATORS)
PERCEIVABLE = 0.75
THRESHOLD = SelectSettings().suspect_threshold  # the default policy's cut
# baseline column → sign that makes "higher = flagged" (the side its filter drops)
BASELINE_SIDES = {"perplexity": 1, "ifd": 1, "rds_mean": -1, "rds_max": -1, "length": -1}
POLICIES = {"perplexity": "perplexity", "ifd": "ifd", "rds": "rds", "length": "length"}
CONDITIONS = ("valuegate", "perplexity", "ifd", "rds", "length", "random", "full")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Data: the zoo, the halves of the validation set.
# --------------------------------------------------------------------------------------------------

def build_set(name: str, a) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """``(frame, reference, full_valid)``: the rows scored (training zoo ``role = "train"`` and the corrupted
    calibration half ``role = "calib"``, with ``corruption``: ``""`` or the generator), the reference half of
    the validation set, and the whole validation set."""
    cls = SETS[name]
    if name == "demo":
        train = read_jsonl(DEMO / "train.jsonl")
        valid = read_jsonl(DEMO / "valid.jsonl")
    else:
        src = read_jsonl(a.data / f"{name}_train.jsonl")
        valid = read_jsonl(a.data / f"{name}_test.jsonl")
        order = np.random.default_rng([a.seed, 0]).permutation(len(src))
        clean = [{**src[i], "corruption": ""} for i in order[:a.clean]]
        bad = corrupt_rows(src, KINDS, a.per_type, a.seed, cls, pool=[int(i) for i in order[a.clean:]])
        train = clean + bad
    half = np.random.default_rng([a.seed, 1]).permutation(len(valid))
    ref_idx, cal_idx = sorted(half[:len(valid) // 2]), sorted(half[len(valid) // 2:])
    ref = [valid[i] for i in ref_idx]
    cal = [valid[i] for i in cal_idx]
    calib = [{**r, "corruption": ""} for r in cal] + corrupt_rows(cal, KINDS, a.calib_per_type, a.seed + 1, cls)
    keep = ["prompt", "response", cls, "corruption"]
    rows = [{**{k: r.get(k, "") for k in keep}, "role": "train"} for r in train]
    rows += [{**{k: r.get(k, "") for k in keep}, "role": "calib"} for r in calib]
    frame = pl.DataFrame(rows).with_columns(pl.col("corruption").fill_null(""))
    vcols = ["prompt", "response", cls]
    return (frame, pl.DataFrame([{k: r[k] for k in vcols} for r in ref]),
            pl.DataFrame([{k: r[k] for k in vcols} for r in valid]))


def scored(name: str, frame: pl.DataFrame, valid: pl.DataFrame, a, tag: str) -> tuple[pl.DataFrame, float]:
    """``valuegate.score(frame, valid)`` (default settings), cached in ``<out>/baselines-scores-<tag>.parquet``."""
    import valuegate

    path = a.out / f"baselines-scores-{tag}.parquet"
    meta = a.out / f"baselines-scores-{tag}.json"
    if path.exists() and meta.exists():
        return pl.read_parquet(path), json.loads(meta.read_text())["seconds"]
    t0 = time.perf_counter()
    out = valuegate.score(frame, valid)
    secs = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    out.write_parquet(path)
    meta.write_text(json.dumps({"seconds": secs, "rows": frame.height, "valid": valid.height}))
    print(f"scored {tag}: {frame.height} rows against {valid.height} in {secs:.0f}s", flush=True)
    return out, secs


# --------------------------------------------------------------------------------------------------
# Detection.
# --------------------------------------------------------------------------------------------------

def auc(score: np.ndarray, label: np.ndarray) -> float:
    from valuegate.engine.detection import detection_auc

    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-1e300)
    label = np.asarray(label, dtype=bool)
    return detection_auc(score, label) if 0 < label.sum() < label.size else float("nan")


# --------------------------------------------------------------------------------------------------
# Cost.
# --------------------------------------------------------------------------------------------------

def cost(frame: pl.DataFrame, n: int) -> dict:
    """Seconds per 1,000 samples of each method on the first ``n`` rows of ``frame``."""
    import torch

    from valuegate.engine.baselines import unconditional_losses
    from valuegate.engine.cheap_baselines import unit_rows as _unit
    from valuegate.engine.encoding import length_batches
    from valuegate.engine.extraction import _token_block, counted_mask, extract_sparse, pad_batch
    from valuegate.engine.model import encode_samples, load_model, load_tokenizer
    from valuegate.inputs.rows import samples_from_frame
    from valuegate.settings import load_settings

    st = load_settings(None, {})
    ex = st.extract
    sub = frame.head(n).select("prompt", "response")
    samples = samples_from_frame(sub, "cost")
    tok = load_tokenizer(st.model)
    lm = load_model(st.model, tok, False)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def timed(fn, reps: int = 2) -> float:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    enc = encode_samples(tok, samples, ex.loss_on, ex.max_length, ex.truncation)
    batches = length_batches([len(e.input_ids) for e in enc], ex.batch_size, ex.max_batch_tokens)

    def forward(head: bool) -> list[np.ndarray]:
        pooled = []
        for b in batches:
            items = [enc[i] for i in b]
            ids, mask = pad_batch(items, pad_id, lm.device)
            with torch.inference_mode():
                h = lm.final_hidden(ids, mask)
                counted = counted_mask(items, mask)
                if head:
                    _token_block(lm, h, ids, counted, [e.n_counted for e in items])
                pooled.append(h.float().mean(1).numpy())
        return pooled

    pooled = np.concatenate(forward(False))
    vpooled = np.resize(pooled, (100, pooled.shape[1]))  # 100 validation vectors
    methods = {"tok": lambda: encode_samples(tok, samples, ex.loss_on, ex.max_length, ex.truncation),
               "bare": lambda: forward(False), "loss": lambda: forward(True),
               "feat": lambda: extract_sparse(lm, enc, ex, samples, progress=False),
               "ifd": lambda: unconditional_losses(lm, samples, ex),
               "rds": lambda: (_unit(pooled) @ _unit(vpooled).T).max(1)}
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(2):  # interleaved rounds: each method's faster repeat
        for key, fn in methods.items():
            best[key] = min(best[key], timed(fn, 1))
    t_tok, t_bare, t_loss, t_feat, t_ifd, t_rds = (best[k] for k in methods)
    per_k = 1000.0 / n
    rows = [
        ("length (tokenise)", t_tok * per_k),
        ("bare forward pass", t_bare * per_k),
        ("perplexity (forward + LM head at response tokens)", t_loss * per_k),
        ("For-Value features (extraction)", t_feat * per_k),
        ("IFD's extra unconditional pass", t_ifd * per_k),
        ("IFD total (loss + unconditional pass)", (t_loss + t_ifd) * per_k),
        ("RDS (forward + cosines to 100 valid)", (t_bare + t_rds) * per_k),
    ]
    bare = t_bare * per_k
    return {"n": n, "threads": torch.get_num_threads(),
            "rows": [{"method": m, "s_per_1000": s, "x_bare_forward": s / bare} for m, s in rows]}


# --------------------------------------------------------------------------------------------------
# Selection.
# --------------------------------------------------------------------------------------------------

def kept_sets(df: pl.DataFrame, seed: int) -> dict[str, np.ndarray]:
    """Row indices each condition keeps (``df``: the scored training rows, in order)."""
    from valuegate.settings import SelectSettings
    from valuegate.tasks.select import select_samples

    t = df.with_columns(pl.format("{}", pl.col("row").cast(pl.String).str.zfill(6)).alias("id"))
    vg = select_samples(t, SelectSettings(policy="suspect"))["keep"].to_numpy()
    k = int(vg.sum())
    out = {"valuegate": np.flatnonzero(vg), "full": np.arange(df.height)}
    for cond, pol in POLICIES.items():
        out[cond] = np.flatnonzero(select_samples(t, SelectSettings(policy=pol, fraction=k / df.height))["keep"])
    out["random"] = np.flatnonzero(select_samples(t, SelectSettings(policy="random", fraction=k / df.height,
                                                                   seed=seed))["keep"])
    return out


def selection(sets: dict[str, tuple[pl.DataFrame, pl.DataFrame, str]], a, result: dict, path: Path) -> None:
    """Fine-tune per seed, set and condition; ``result["selection"]`` is updated and written after each run."""
    import torch
    from transformers import AutoTokenizer

    from tests.benchmarks.bench_selection import evaluate, finetune, load_base
    from valuegate.default_model import ensure_default_model
    from valuegate.engine.model import encode_samples
    from valuegate.inputs.rows import samples_from_frame

    torch.set_num_threads(a.threads)
    model_dir = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sel = result.setdefault("selection", {"runs": [], "base": {}, "sets": {}})
    sel["training"] = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "rank": a.rank, "seeds": a.seed_list,
                       "threads": a.threads, "conditions": a.condition_list}
    prepared = {}
    for name, (tr, valid, cls) in sets.items():
        enc_t = encode_samples(tok, samples_from_frame(tr.select("prompt", "response"), name), "response", 256)
        enc_v = encode_samples(tok, samples_from_frame(valid.select("prompt", "response"), name), "response", 256)
        fam = valid[cls].to_list()
        corrupt = (tr["corruption"] != "").to_numpy()
        prepared[name] = (enc_t, enc_v, fam, corrupt, tr)
        base = evaluate(load_base(model_dir), enc_v, fam, pad_id)
        sel["base"][name] = base
        ks = kept_sets(tr, 0)
        sel["sets"][name] = {"rows": tr.height, "corrupted": int(corrupt.sum()), "valid": valid.height,
                             "kept": {c: len(v) for c, v in ks.items()},
                             "kept_corrupted": {c: int(corrupt[v].sum()) for c, v in ks.items()}}
        print(f"{name}: base val_loss {base['val_loss']:.4f}; kept {sel['sets'][name]['kept']}; corrupted kept "
              f"{sel['sets'][name]['kept_corrupted']}", flush=True)
    for seed in a.seed_list:
        for name in sets:
            enc_t, enc_v, fam, corrupt, tr = prepared[name]
            ks = kept_sets(tr, seed)
            for cond in a.condition_list:
                rows = [int(i) for i in ks[cond]]
                t0 = time.perf_counter()
                model, losses = finetune(model_dir, enc_t, rows, seed, a, pad_id)
                ev = evaluate(model, enc_v, fam, pad_id)
                del model
                run = {"set": name, "condition": cond, "seed": seed, "train_rows": len(rows),
                       "corrupted": int(corrupt[rows].sum()), "val_loss": ev["val_loss"],
                       "exact_match": ev["exact_match"], "seconds": time.perf_counter() - t0,
                       "train_loss_last": float(np.mean(losses[-5:]))}
                sel["runs"].append(run)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()}), flush=True)
                path.write_text(json.dumps(result, indent=1))


def selection_summary(sel: dict) -> list[dict]:
    out = []
    runs = sel["runs"]
    for name in sel["sets"]:
        pick = {(r["condition"], r["seed"]): r for r in runs if r["set"] == name}
        for cond in CONDITIONS:
            rs = [r for (c, _), r in pick.items() if c == cond]
            if not rs:
                continue
            loss = [r["val_loss"] for r in rs]
            em = [r["exact_match"] for r in rs]
            sd = float(np.std(loss, ddof=1)) if len(rs) > 1 else 0.0
            row = {"set": name, "condition": cond, "train_rows": rs[0]["train_rows"],
                   "corrupted": float(np.mean([r["corrupted"] for r in rs])), "seeds": len(rs),
                   "val_loss": f"{np.mean(loss):.4f} ± {sd:.4f}",
                   "exact_match": f"{np.mean(em):.3f} ± {float(np.std(em, ddof=1)) if len(rs) > 1 else 0.0:.3f}",
                   "val_loss_mean": float(np.mean(loss)), "val_loss_std": sd}
            vg = [pick.get(("valuegate", r["seed"])) for r in rs]
            if cond != "valuegate" and all(vg):
                d = [v["val_loss"] - r["val_loss"] for v, r in zip(vg, rs, strict=True)]
                row["d_loss_vs_vg"] = f"{np.mean(d):+.4f}"  # valuegate − condition (negative: valuegate better)
            out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------------

def print_tables(res: dict) -> None:
    m = res["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average {os.getloadavg()}")
    print(f"configuration: {json.dumps(res['config'])}")
    if "cost" in res:
        print(table(res["cost"]["rows"], ["method", "s_per_1000", "x_bare_forward"],
                    f"\ncost per 1,000 samples ({res['cost']['n']} math rows, {res['cost']['threads']} thread(s))"))
    if res.get("selection", {}).get("runs"):
        sel = res["selection"]
        print(f"\nselection: {json.dumps(sel['training'])}; sets {json.dumps(sel['sets'])}")
        print(table(selection_summary(sel), ["set", "condition", "train_rows", "corrupted", "seeds", "val_loss",
                                             "exact_match", "d_loss_vs_vg"],
                    "\nLoRA fine-tunes at valuegate's kept budget (mean ± std over seeds; d_loss_vs_vg = "
                    "valuegate − condition, negative: valuegate better)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="cost,selection")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the zoo and the validation halves")
    ap.add_argument("--clean", type=int, default=500, help="clean training rows per DataInf set")
    ap.add_argument("--per-type", type=int, default=25, help="corrupted training rows per generator")
    ap.add_argument("--calib-per-type", type=int, default=25, help="corrupted calibration rows per generator")
    ap.add_argument("--cost-rows", type=int, default=200)
    ap.add_argument("--selection-sets", default="demo,math_without_reason")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="suffix of the result file")
    a = ap.parse_args()
    a.seed_list = [int(s) for s in a.seeds.split(",")]
    a.condition_list = [c for c in a.conditions.split(",") if c]
    parts = set(a.parts.split(","))
    import torch

    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"baselines{('-' + a.tag) if a.tag else ''}.json"
    res: dict = {"machine": machine(), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(a).items()}}
    t_start = time.perf_counter()
    if "cost" in parts:
        frame, ref, _ = build_set("math_without_reason", a)
        res["cost"] = cost(frame.filter(pl.col("role") == "train"), a.cost_rows)
        path.write_text(json.dumps(res, indent=1))
    if "selection" in parts:
        sets = {}
        for name in a.selection_sets.split(","):
            frame, ref, full = build_set(name, a)
            if name == "demo":  # the demo as a user runs it: against its whole validation set
                tr = frame.filter(pl.col("role") == "train")
                df, _ = scored(name, tr, full, a, "demo-full")
            else:
                df, _ = scored(name, frame, ref, a, name + "-ref")
                df = df.filter(pl.col("role") == "train").with_columns(pl.int_range(pl.len()).alias("row"))
            sets[name] = (df, full, SETS[name])
        selection(sets, a, res, path)
    res["wall_s"] = time.perf_counter() - t_start
    res["peak_rss_mb"] = peak_rss_mb()
    path.write_text(json.dumps(res, indent=1))
    print_tables(res)


if __name__ == "__main__":
    main()
