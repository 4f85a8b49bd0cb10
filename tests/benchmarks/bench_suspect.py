"""Mislabeled-data detection: which signal flags corrupted fine-tuning samples, and the combined suspect.

    python -m tests.benchmarks.bench_suspect [--data DIR] [--out bench-results] [--loss-on response all]
                                             [--quick] [--evaluate-only]

The DataInf sets (grammars: sentence transformations; math_without_reason: word problems answered with a
number) get a seeded 20% of their 900 training responses corrupted, one corruption per derived set:

- ``swap``: the response of a sample of another class (``variation``).
- ``copy`` (grammars): the untransformed input sentence, i.e. easier to predict than the right answer.
- ``truncate``: the first half of the response's words (grammars), or the answer without its number (math).
- ``wrong`` (math): the right template with a wrong number (the answer ± 1..20).

Every form is evaluated with the global reference (every validation sample) and the local one (each
sample's ``score.suspect_neighbours`` nearest validation samples by centred mean hidden state; the
neighbourhoods are cached beside the signals, ``nb`` column).

Every derived set is ingested into one workspace per loss mode (clean rows have the same content, hence
the same id and features, in every set: each unique sample is extracted once) and scored by the product's
own path (``score_dataset``: sparse features at the defaults, every signal, leave-one-out reference)
against the clean validation set. Reported: ROC AUC of every signal for flagging the corrupted rows (as
"low = suspect"; below 0.5 means the high side flags them), the loss baselines, and the AUC of each
candidate suspect form, and recall / false-positive rate of the default form at a few thresholds. The
candidates come from the prototype, from the signals' directions, and from an exhaustive search over
1-3 terms on the grammars/response corruptions only; the report also names the form that maximises the
worst AUC over the perceivable corruptions of the *other* data set (leave one set out).
The signal table is cached per loss mode (``suspect-signals-<loss_on>.parquet``) so ``--evaluate-only``
re-runs the evaluation; features are cached in the benchmark's workspace, so a re-run extracts nothing new.
With the loss on all tokens extraction is ~3x slower (the head runs on every prompt token): by default
that mode uses every 3rd training row (300 per set, 60 corrupted) against the whole validation set.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import polars as pl

from tests.benchmarks.bench_engine import DEFAULT_DATA, machine
from tests.benchmarks.tables import table
from valuegate.engine.detection import detection_auc
from valuegate.engine.signals import SuspectReference, calibrated_suspect, combine_suspect
from valuegate.storage.schemas import SIGNAL_COLUMNS

SETS = {"grammars": ("swap", "copy", "truncate"), "math_without_reason": ("swap", "wrong", "truncate")}
FRACTION = 0.2
SEED = 0
PERCEIVABLE = 0.75  # a corruption is "perceivable" when some single signal reaches this AUC
# candidate suspect forms: (name, [signal:side ...], combine)
FORMS: list[tuple[str, list[str], str]] = [
    ("self+loss (prototype)", ["log_self_influence:two", "mean_loss:two"], "rms"),
    ("self+loss+ccos", ["log_self_influence:two", "mean_loss:two", "centred_cosine_nearest:low"], "rms"),
    ("self+loss+ccos all+hard", ["log_self_influence:two", "mean_loss:two", "centred_cosine_nearest:low",
                                 "hard_log_self_influence:two", "hard_mean_loss:two",
                                 "hard_centred_cosine_nearest:low"], "rms"),
    ("self+cval", ["log_self_influence:two", "centred_value_mean:low"], "rms"),
    # global reference: the best of an exhaustive search over 1-3 one/two-sided terms of 12 signals, rms or
    # max, on the grammars/response corruptions (copy, truncate), plus the side that flags swaps (high loss)
    ("self-+cval-+cos++loss+", ["log_self_influence:low", "centred_value_mean:low", "cosine_mean:high",
                                "mean_loss:high"], "rms"),
    # local reference (k = 5 and 10): exhaustive search over 1-3 terms of all 20 signals, rms, on every
    # perceivable response-token corruption of both sets: the best worst case, and the best mean (the default)
    ("ccosn-+self±+loss+", ["centred_cosine_nearest:low", "log_self_influence:two", "mean_loss:high"], "rms"),
    ("default: cval-+self±+loss±", ["centred_value_mean:low", "log_self_influence:two", "mean_loss:two"], "rms"),
    ("every signal two-sided", [f"{s}:two" for s in SIGNAL_COLUMNS], "rms"),
    ("every signal two-sided max", [f"{s}:two" for s in SIGNAL_COLUMNS], "max"),
]
THRESHOLDS = (2.0, 2.5, 3.0)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC of ``score`` (higher = positive) for boolean ``label``; NaN when one class is empty."""
    label = np.asarray(label, dtype=bool)
    return detection_auc(score, label) if 0 < label.sum() < label.size else float("nan")


# --------------------------------------------------------------------------------------------------
# Corruptions.
# --------------------------------------------------------------------------------------------------

_EOS = "</s>"


def _grammar_input(prompt: str) -> str:
    m = re.search(r"For example:\s*(.*?)\s*->\s*$", prompt, flags=re.S)
    if not m:
        raise ValueError(f"no input sentence in {prompt!r}")
    return m.group(1)


def corrupt(rows: list[dict], dataset: str, kind: str, rng: np.random.Generator) -> tuple[list[dict], np.ndarray]:
    """A copy of ``rows`` with a seeded ``FRACTION`` of responses corrupted by ``kind``.

    Returns:
        the rows (``corrupted`` column added) and the boolean label array.
    """
    n = len(rows)
    pick = np.zeros(n, dtype=bool)
    pick[rng.choice(n, round(FRACTION * n), replace=False)] = True
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        if pick[i]:
            resp = r["response"]
            body = resp[:-len(_EOS)] if resp.endswith(_EOS) else resp
            if kind == "swap":
                others = [j for j in range(n) if rows[j]["variation"] != r["variation"]]
                r["response"] = rows[int(rng.choice(others))]["response"]
            elif kind == "copy":
                r["response"] = " " + _grammar_input(r["prompt"]) + _EOS
            elif kind == "truncate" and dataset == "grammars":
                words = body.split()
                r["response"] = " " + " ".join(words[:max(1, len(words) // 2)]) + _EOS
            elif kind == "truncate":
                r["response"] = "Answer:" + _EOS
            elif kind == "wrong":
                m = re.search(r"-?\d+", body)
                delta = int(rng.integers(1, 21)) * (1 if rng.random() < 0.5 else -1)
                r["response"] = body[:m.start()] + str(int(m.group()) + delta) + body[m.end():] + _EOS
            else:
                raise ValueError(kind)
        r["corrupted"] = bool(pick[i] and r["response"] != rows[i]["response"])
        out.append(r)
    return out, np.array([r["corrupted"] for r in out])


# --------------------------------------------------------------------------------------------------
# Stage 1: signals of every derived set through the product's scoring path.
# --------------------------------------------------------------------------------------------------


def compute_signals(data: Path, out: Path, loss_on: str, quick: bool, every: int = 1) -> pl.DataFrame:
    """Score every derived set; one row per (dataset, corruption, sample) with every signal.

    ``every``: keep every n-th training row (the validation set stays whole), for the slower loss modes."""
    from valuegate.settings import load_settings
    from valuegate.storage.lance import Workspace
    from valuegate.storage.samples import ensure_sample_tables
    from valuegate.tasks.ingest import ingest_file
    from valuegate.tasks.score import score_dataset
    from valuegate.tasks.validation_set import register_valset

    frames = []
    work = out / "suspect-work"
    work.mkdir(parents=True, exist_ok=True)
    ws = Workspace(str(work / f"ws-{loss_on}"))
    ensure_sample_tables(ws)
    for dataset, kinds in SETS.items():
        train = [json.loads(x) for x in (data / f"{dataset}_train.jsonl").read_text().splitlines() if x.strip()]
        train = train[::every]
        valid_path = data / f"{dataset}_test.jsonl"
        if quick:
            train = train[::10]
            valid_path = work / f"{dataset}_test_quick.jsonl"
            valid_path.write_text("".join(x + "\n" for x in
                                          (data / f"{dataset}_test.jsonl").read_text().splitlines()[::5]))
        register_valset(ws, f"{dataset}-val", str(valid_path), 1_000_000)
        for kind in kinds:
            rows, labels = corrupt(train, dataset, kind, np.random.default_rng([SEED, len(kind), ord(kind[0])]))
            path = work / f"{dataset}-{kind}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            name = f"{dataset}-{kind}-{len(train)}"
            ingest_file(ws, name, str(path), 1_000_000)
            settings = load_settings(overrides={"extract": {"loss_on": loss_on}, "score": {"aggregate": "mean"},
                                                "workspace": ws.uri})
            t0 = time.perf_counter()
            rep = score_dataset(ws, name, f"{dataset}-val", settings, progress=True, write=False)
            print(f"{loss_on} {name}: {rep.line()} ({time.perf_counter() - t0:.0f}s)", flush=True)
            scored = pl.from_arrow(rep.table).select("id", "value", "mean_loss", "suspect",
                                                     *(c for c in SIGNAL_COLUMNS if c != "mean_loss"))
            scored = scored.with_columns(pl.Series("nb", list(_train_neighbours(
                ws, rep.model_fp, scored["id"].to_list(), settings, f"{dataset}-val"))))
            from valuegate.inputs.rows import samples_from_frame
            from valuegate.tasks.ingest import sample_id, sample_record

            ids = [sample_id(sample_record(s)) for s in samples_from_frame(pl.DataFrame(rows), str(path))]
            lab = pl.DataFrame({"id": ids, "corrupted": labels}).unique("id", keep="first")
            frames.append(scored.join(lab, on="id", how="inner").with_columns(
                pl.lit(loss_on).alias("loss_on"), pl.lit(dataset).alias("dataset"), pl.lit(kind).alias("kind")))
        # the validation reference, for the forms evaluated offline
        ref = reference_table(ws, settings, f"{dataset}-val")
        frames.append(ref.with_columns(pl.lit(loss_on).alias("loss_on"), pl.lit(dataset).alias("dataset"),
                                       pl.lit("reference").alias("kind")))
    df = pl.concat(frames, how="diagonal_relaxed")
    df.write_parquet(out / f"suspect-signals-{loss_on}.parquet")
    return df


def _mean_hidden_of(ws, fp: str, ids: list[str]) -> np.ndarray:
    from valuegate.storage import features as fstore
    from valuegate.tasks.score import _aligned, _hidden

    return _hidden(_aligned(fstore.read_features(ws, fp, ids, ["id", "mean_hidden"]), ids), len(ids))


def _valid_hidden(ws, settings, valset: str) -> tuple[list[str], np.ndarray]:
    from valuegate.engine.model import fingerprint_settings, load_tokenizer, model_fingerprint
    from valuegate.storage.valsets import read_valset
    from valuegate.tasks.validation_set import valset_samples

    _, vrows = read_valset(ws, valset)
    vids, _ = valset_samples(vrows)
    fp = model_fingerprint(fingerprint_settings(settings.model, settings.extract, load_tokenizer(settings.model), 1.0))
    return vids, _mean_hidden_of(ws, fp, vids)


def _train_neighbours(ws, fp: str, ids: list[str], settings, valset: str) -> np.ndarray:
    """``(n, k)`` each scored sample's nearest validation samples (the local reference, product code)."""
    from valuegate.engine.signals import hidden_neighbours

    _, vh = _valid_hidden(ws, settings, valset)
    return hidden_neighbours(_mean_hidden_of(ws, fp, ids), vh, vh.mean(0), settings.score.suspect_neighbours)


def reference_table(ws, settings, valset: str) -> pl.DataFrame:
    """The leave-one-out signals of the validation samples (the reference of the suspect score)."""
    import pyarrow as pa

    from valuegate.engine.aggregate import projected_centre, reference_signals
    from valuegate.engine.model import fingerprint_settings, load_tokenizer, model_fingerprint
    from valuegate.engine.signals import SparseSet, ValidSide
    from valuegate.storage import features as fstore
    from valuegate.storage.valsets import read_valset
    from valuegate.tasks.score import _feature_matrix, _hidden
    from valuegate.tasks.validation_set import valset_samples

    _, vrows = read_valset(ws, valset)
    vids, _ = valset_samples(vrows)
    ex = settings.extract
    fp = model_fingerprint(fingerprint_settings(settings.model, ex, load_tokenizer(settings.model), 1.0))
    meta = fstore.read_feature_set(ws, fp)
    vocab, width = int(meta["vocab_size"]), int(meta["row_width"])
    cols = ["id", "token_ids", "rows", "n_tokens", "mean_loss", "self_influence", "error_sum", "mean_hidden",
            "hard_token_ids", "hard_rows", "hard_error_sum", "hard_n_tokens", "hard_mean_loss"]
    _, vt = _feature_matrix(fstore.read_features(ws, fp, vids, cols), vids, vocab, width)
    vs = SparseSet.from_arrow(vt, vocab, width)
    vside = ValidSide.build(vs, projected_centre(ex, int(meta["hidden_size"]), vocab, _hidden(vt, len(vids)),
                                                 vs.tokens))
    ref = reference_signals(vs, SparseSet.from_arrow(vt, vocab, width, "hard_"), vside, settings.score.nearest_k)
    from valuegate.engine.signals import hidden_neighbours

    vh = _valid_hidden(ws, settings, valset)[1]
    nb = hidden_neighbours(vh, vh, vh.mean(0), settings.score.suspect_neighbours, loo=True)
    return pl.from_arrow(pa.table({"id": vids, **ref})).with_columns(pl.Series("nb", list(nb)))


# --------------------------------------------------------------------------------------------------
# Stage 2: evaluation.
# --------------------------------------------------------------------------------------------------


def _nb(part: pl.DataFrame) -> np.ndarray:
    return np.stack(part["nb"].to_numpy()).astype(np.int64)


def _references(part: pl.DataFrame) -> tuple[dict[str, np.ndarray], SuspectReference]:
    """The global reference (signals) and the local one (with the validation neighbourhoods) of one set."""
    ref = part.filter(pl.col("kind") == "reference")
    signals = {c: ref[c].to_numpy().astype(np.float64) for c in SIGNAL_COLUMNS}
    return signals, SuspectReference(signals, _nb(ref))


def evaluate(df: pl.DataFrame) -> dict:
    """AUC of every signal, baseline and candidate form per (loss_on, dataset, corruption); the chosen form."""
    cases, signal_rows, form_rows = [], [], []
    for (loss_on, dataset), part in df.group_by(["loss_on", "dataset"], maintain_order=True):
        reference, local_ref = _references(part)
        for kind in SETS[dataset]:
            sub = part.filter(pl.col("kind") == kind)
            label = sub["corrupted"].to_numpy()
            sig = {c: sub[c].to_numpy().astype(np.float64) for c in SIGNAL_COLUMNS}
            row = {"loss_on": loss_on, "dataset": dataset, "kind": kind, "n": sub.height,
                   "corrupted": int(label.sum())}
            per_signal = {c: auc(-sig[c], label) for c in SIGNAL_COLUMNS}  # low = suspect
            best_name = max(per_signal, key=lambda c: max(per_signal[c], 1 - per_signal[c]))
            best = max(per_signal[best_name], 1 - per_signal[best_name])
            row.update({"best_signal": best_name, "best_auc": best,
                        "high loss": auc(sig["mean_loss"], label), "low loss": auc(-sig["mean_loss"], label)})
            signal_rows.append({**{k: row[k] for k in ("loss_on", "dataset", "kind")}, **per_signal})
            forms = {}
            nb = _nb(sub)
            for name, spec, how in FORMS:
                pairs = [tuple(s.split(":")) for s in spec]
                forms[name] = auc(combine_suspect(sig, reference, pairs, how), label)
                forms[f"{name} local"] = auc(combine_suspect(sig, local_ref, pairs, how, nb), label)
            form_rows.append({**{k: row[k] for k in ("loss_on", "dataset", "kind")}, **forms})
            # perceivable: some single signal or some form (global or local) flags it
            row["perceivable"] = bool(max(best, *forms.values()) >= PERCEIVABLE)
            cases.append(row)
    # leave one data set out: choose (best mean AUC) on the other set's perceivable corruptions, response mode
    choice = {}
    for held in SETS:
        fit = [f for c, f in zip(cases, form_rows, strict=True)
               if c["dataset"] != held and c["perceivable"] and c["loss_on"] == "response"]
        names = [n for n in form_rows[0] if n not in ("loss_on", "dataset", "kind")] if form_rows else []
        scores = {name: float(np.mean([f[name] for f in fit])) for name in names} if fit else {}
        choice[held] = max(scores, key=scores.get) if scores else None
    # the threshold of the suspect policy: recall and false-positive rate of the default form per case
    from valuegate.settings import default_settings

    sc = default_settings().score
    spec = [tuple(x.split(":")) for x in sc.suspect]
    thresholds = []
    for (loss_on, dataset), part in df.group_by(["loss_on", "dataset"], maintain_order=True):
        reference, local_ref = _references(part)
        local = sc.suspect_neighbours > 0
        for kind in SETS[dataset]:
            sub = part.filter(pl.col("kind") == kind)
            label = sub["corrupted"].to_numpy().astype(bool)
            sus = calibrated_suspect({c: sub[c].to_numpy().astype(np.float64) for c in SIGNAL_COLUMNS},
                                     local_ref if local else reference, spec, sc.suspect_combine,
                                     _nb(sub) if local else None)
            row = {"loss_on": loss_on, "dataset": dataset, "kind": kind}
            for t in THRESHOLDS:
                row[f"recall@{t:g}"] = float((sus[label] > t).mean())
                row[f"fpr@{t:g}"] = float((sus[~label] > t).mean())
            thresholds.append(row)
    return {"cases": cases, "signals": signal_rows, "forms": form_rows, "choice_by_held_out_set": choice,
            "default_form": {"suspect": list(sc.suspect), "combine": sc.suspect_combine}, "thresholds": thresholds}


def print_tables(res: dict) -> None:
    """The tables of an evaluation."""
    print(table(res["cases"], ["loss_on", "dataset", "kind", "corrupted", "best_signal", "best_auc", "high loss",
                               "low loss", "perceivable"], "corruptions: best single signal (AUC, better side)"))
    names = [n for n, _, _ in FORMS]
    print(table(res["forms"], ["loss_on", "dataset", "kind", *names], "suspect forms, global reference (AUC)"))
    print(table(res["forms"], ["loss_on", "dataset", "kind", *(f"{n} local" for n in names)],
                "suspect forms, local reference (AUC)"))
    print(table(res["signals"], ["loss_on", "dataset", "kind", *SIGNAL_COLUMNS],
                "every signal (AUC of low = suspect; < 0.5: high flags)"))
    print("form chosen with each data set held out:", res["choice_by_held_out_set"])
    cols = [f"{m}@{t:g}" for t in THRESHOLDS for m in ("recall", "fpr")]
    print(table(res["thresholds"], ["loss_on", "dataset", "kind", *cols],
                f"default suspect {res['default_form']}: flagged corrupted (recall) and clean (fpr) rows"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--loss-on", nargs="+", default=["response", "all"])
    ap.add_argument("--quick", action="store_true", help="a tenth of each set (a smoke run)")
    ap.add_argument("--every", type=int, nargs="+", default=[1, 3],
                    help="per loss mode: keep every n-th training row (all-token extraction is ~3x slower)")
    ap.add_argument("--evaluate-only", action="store_true", help="re-use the cached signal table")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    frames = []
    for i, loss_on in enumerate(args.loss_on):
        cache = args.out / f"suspect-signals-{loss_on}.parquet"
        every = args.every[min(i, len(args.every) - 1)]
        frames.append(pl.read_parquet(cache) if args.evaluate_only and cache.exists()
                      else compute_signals(args.data, args.out, loss_on, args.quick, every))
    df = pl.concat(frames, how="diagonal_relaxed")
    res = evaluate(df)
    res["machine"] = machine()
    res["seconds"] = time.perf_counter() - t0
    print_tables(res)
    (args.out / "suspect.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
