"""Engine benchmarks on the embedded default model (SmolLM2-135M-Instruct) and the DataInf sets.

    python -m tests.benchmarks.bench_engine [--data DIR] [--out bench-results] [--quick]

Sections (each prints a table and writes JSON under --out):

- effectiveness: influential-data identification on grammars and math_without_reason (for each validation
  sample rank the train samples; relevant = same ``variation``): mean ROC AUC and recall@90, exact and
  sparse (the defaults), loss on all tokens (DataInf's protocol) and on the response only.
- fidelity: mean per-validation-sample Spearman of sparse against exact, and stored bytes per sample, over
  a grid of (support top-k, k_h), from the same forward pass as the exact scores.
- speed: sparse extraction throughput as a ratio to a bare ``model(**batch)`` over the same length-sorted
  batches, interleaved in one run; exact pairwise scoring time; peak RSS.
- oracle gap: autograd per-sample LM-head gradients (the backward pass For-Value replaces) against the
  forward-only path, for the same pairs: time per train sample and agreement.
- stored (only with ``--only stored``; issue 19): the default sparse rows as the store keeps them
  (feature format 6: int8 steps with a scale per support entry, ``stored_features``) and as format 5
  stored them (float16) against the float32 rows and exact, per set and loss mode: Spearman against exact,
  influential-data AUC and recall@90, max relative difference to float32.
  ``--sets`` picks the sets.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from tests.benchmarks.tables import cpu_name
from tests.tiny import autograd_head_gradient
from valuegate.engine.encoding import length_batches
from valuegate.engine.extraction import iter_token_blocks, pad_batch, projections, stored_features
from valuegate.engine.forvalue import TokenBlock, exact_cross, sparse_cross, sparse_features
from valuegate.engine.model import encode_samples, load_model
from valuegate.inputs.rows import read_samples
from valuegate.settings import Settings, default_settings

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "datainf"
SETS = ("grammars", "math_without_reason")
# (support top-k, k_h); k_h = 0 keeps h exact. The wide grid of the first quick runs (k up to 64, k_h up
# to 256) showed the trade-off lives here; exact-h points are the references for each support size.
GRID = [(2, 128), (4, 0), (4, 64), (4, 128), (4, 192), (8, 64), (8, 128), (16, 0), (16, 64), (16, 128)]
# evaluated on every set and loss mode (the full grid only on grammars with the loss on all tokens)
CANDIDATES = [(4, 128), (8, 128), (4, 192), (8, 192), (16, 64), (16, 128)]


def machine() -> dict:
    """What the numbers were measured on."""
    import os

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": "cpu"}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rank_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    ranks = pl.Series(scores).rank("average").to_numpy()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def identification(values: np.ndarray, train_cls: np.ndarray, valid_cls: np.ndarray, k: int = 90) -> dict:
    """Mean ROC AUC and recall@k of ranking train rows by value for each validation row."""
    aucs, recalls = [], []
    for j in range(values.shape[1]):
        pos = train_cls == valid_cls[j]
        aucs.append(_rank_auc(values[:, j], pos))
        top = np.argsort(-values[:, j], kind="stable")[:k]
        recalls.append(pos[top].sum() / min(k, pos.sum()))
    return {"auc": float(np.mean(aucs)), "recall@90": float(np.mean(recalls))}


def spearman_cols(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over columns of the Spearman correlation of a and b."""
    out = []
    for j in range(a.shape[1]):
        ra = pl.Series(a[:, j]).rank("average").to_numpy()
        rb = pl.Series(b[:, j]).rank("average").to_numpy()
        out.append(np.corrcoef(ra, rb)[0, 1])
    return float(np.mean(out))


def load_set(data: Path, name: str, limit: int | None):
    tdf, train = read_samples(data / f"{name}_train.jsonl")
    vdf, valid = read_samples(data / f"{name}_test.jsonl")
    if limit:
        step = max(1, len(train) // limit)
        keep = list(range(0, len(train), step))[:limit]
        train, tdf = [train[i] for i in keep], tdf[keep]
        vkeep = list(range(0, len(valid), max(1, len(valid) // max(1, limit // 9))))[: max(10, limit // 9)]
        valid, vdf = [valid[i] for i in vkeep], vdf[vkeep]
    return train, tdf["variation"].to_numpy(), valid, vdf["variation"].to_numpy()


def one_pass(lm, settings: Settings, train, valid, loss_on: str, grid: list[tuple[int, int]]) -> dict:
    """One forward pass over each set: the exact matrix and the sparse matrix of every grid point.

    Each train block is scored against the validation features as soon as it is extracted, so memory
    holds the validation features and the (n_train, n_valid) matrices, never the train features.
    """
    ex = settings.extract.model_copy(update={"loss_on": loss_on})
    enc_t = encode_samples(lm.tokenizer, train, loss_on, ex.max_length)
    enc_v = encode_samples(lm.tokenizer, valid, loss_on, ex.max_length)
    projs = {kh: projections(ex.model_copy(update={"hidden_dim": kh}), lm.hidden_size, lm.vocab_size)[0]
             for kh in {kh for _, kh in grid}}
    t0 = time.perf_counter()
    vparts = list(iter_token_blocks(lm, enc_v, ex, valid, progress=False))
    t_valid = time.perf_counter() - t0
    inv = np.argsort([i for idx, _ in vparts for i in idx])
    vblock = TokenBlock.concat([b for _, b in vparts])
    vfeats = {}
    for k, kh in grid:
        feats = [f for _, b in vparts for f in sparse_features(b, k, projs[kh], None)]
        vfeats[(k, kh)] = [feats[i] for i in inv]
    exact = np.zeros((len(train), len(valid)))
    sparse = {g: {"values": np.zeros((len(train), len(valid))), "score_s": 0.0, "bytes": [], "support": [],
                  "dropped": []} for g in grid}
    t_exact = 0.0
    for idx, block in iter_token_blocks(lm, enc_t, ex, train, progress=True, desc=f"{loss_on}"):
        t1 = time.perf_counter()
        exact[idx] = exact_cross(block, vblock).numpy()[:, inv]
        t_exact += time.perf_counter() - t1
        for g in grid:
            feats = sparse_features(block, g[0], projs[g[1]], None)
            t1 = time.perf_counter()
            sparse[g]["values"][idx] = sparse_cross(feats, vfeats[g], lm.vocab_size)
            sparse[g]["score_s"] += time.perf_counter() - t1
            sparse[g]["bytes"] += [f.nbytes for f in feats]
            sparse[g]["support"] += [len(f.token_ids) for f in feats]
            sparse[g]["dropped"] += [f.dropped_mass for f in feats]
    for g in grid:
        for key in ("bytes", "support", "dropped"):
            sparse[g][key] = float(np.mean(sparse[g][key]))
    return {"exact": exact, "exact_kernel_s": t_exact, "valid_extract_s": t_valid, "sparse": sparse,
            "counted_train": int(sum(e.n_counted for e in enc_t)), "counted_valid": int(sum(e.n_counted for e in enc_v))}


def bench_effectiveness_fidelity(lm, settings: Settings, data: Path, limit: int | None) -> dict:
    default = (settings.extract.support_k, settings.extract.hidden_dim)
    results = {"effectiveness": [], "fidelity": []}
    for name in SETS:
        train, tcls, valid, vcls = load_set(data, name, limit)
        for loss_on in ("all", "response"):
            grid = GRID if loss_on == "all" and name == "grammars" else sorted({default, *CANDIDATES})
            r = one_pass(lm, settings, train, valid, loss_on, grid)
            ex_id = identification(r["exact"], tcls, vcls)
            sp = r["sparse"][default]
            sp_id = identification(sp["values"], tcls, vcls)
            results["effectiveness"].append({
                "set": name, "loss_on": loss_on, "n_train": len(train), "n_valid": len(valid),
                "exact_auc": ex_id["auc"], "exact_recall@90": ex_id["recall@90"],
                "sparse_auc": sp_id["auc"], "sparse_recall@90": sp_id["recall@90"],
                "sparse_spearman": spearman_cols(sp["values"], r["exact"]),
                "exact_kernel_s": r["exact_kernel_s"], "counted_train_tokens": r["counted_train"]})
            print(json.dumps(results["effectiveness"][-1]))
            for (k, kh), s in r["sparse"].items():
                results["fidelity"].append({
                    "set": name, "loss_on": loss_on, "support_k": k, "k_h": kh or lm.hidden_size,
                    "spearman": spearman_cols(s["values"], r["exact"]),
                    "auc": identification(s["values"], tcls, vcls)["auc"],
                    "bytes_per_sample": s["bytes"], "mean_support": s["support"],
                    "dropped_mass": s["dropped"], "score_s": s["score_s"]})
    return results


def bench_speed(lm, settings: Settings, data: Path, limit: int | None, loss_on: str = "all") -> dict:
    """Interleaved per batch: bare ``model(**batch)`` vs our extraction (forward + head + sparse rows)."""
    train, _, _, _ = load_set(data, "grammars", limit)
    ex = settings.extract.model_copy(update={"loss_on": loss_on})
    enc = encode_samples(lm.tokenizer, train, loss_on, ex.max_length)
    ph, pe = projections(ex, lm.hidden_size, lm.vocab_size)
    batches = length_batches([len(e.input_ids) for e in enc], ex.batch_size, ex.max_batch_tokens)
    pad = lm.tokenizer.pad_token_id
    # warm-up
    ids, mask = pad_batch([enc[i] for i in batches[0]], pad, lm.device)
    with torch.inference_mode():
        lm.model(input_ids=ids, attention_mask=mask)
    t_bare = t_ours = 0.0
    for batch in batches:
        items = [enc[i] for i in batch]
        ids, mask = pad_batch(items, pad, lm.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            lm.model(input_ids=ids, attention_mask=mask)
        t_bare += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _, block in iter_token_blocks(lm, items, ex, progress=False):
            sparse_features(block, ex.support_k, ph, pe)
        t_ours += time.perf_counter() - t0
    tokens = sum(len(e.input_ids) for e in enc)
    return {"loss_on": loss_on, "samples": len(enc), "tokens": tokens, "bare_s": t_bare, "extract_s": t_ours,
            "bare_samples_per_s": len(enc) / t_bare, "extract_samples_per_s": len(enc) / t_ours,
            "extract_tokens_per_s": tokens / t_ours, "throughput_ratio": t_bare / t_ours,
            "batch_size": ex.batch_size}


def bench_oracle_gap(lm, settings: Settings, data: Path, n_train: int = 24, n_valid: int = 8) -> dict:
    """Per-sample autograd LM-head gradients vs forward-only exact scores on the same pairs."""
    train, _, valid, _ = load_set(data, "grammars", None)
    train, valid = train[:n_train], valid[:n_valid]
    ex = settings.extract.model_copy(update={"loss_on": "all"})
    enc_t = encode_samples(lm.tokenizer, train, "all", ex.max_length)
    enc_v = encode_samples(lm.tokenizer, valid, "all", ex.max_length)
    head = lm.model.get_output_embeddings()

    def grad(e) -> torch.Tensor:
        return autograd_head_gradient(lm.model, e.input_ids, e.counted, torch.float32).reshape(-1)

    try:
        for p in lm.model.parameters():
            p.requires_grad_(p is head.weight)
        gv = torch.stack([grad(e) for e in enc_v])
        t0 = time.perf_counter()
        ref = torch.stack([grad(e) @ gv.T for e in enc_t])
        t_grad = time.perf_counter() - t0
    finally:
        for p in lm.model.parameters():
            p.requires_grad_(True)
    vb = TokenBlock.concat([b for _, b in iter_token_blocks(lm, enc_v, ex, progress=False)])
    t0 = time.perf_counter()
    parts = list(iter_token_blocks(lm, enc_t, ex, progress=False))
    got = np.zeros((len(enc_t), len(enc_v)))
    for idx, b in parts:
        got[idx] = exact_cross(b, vb).numpy()
    t_fwd = time.perf_counter() - t0
    vorder = [i for idx, _ in iter_token_blocks(lm, enc_v, ex, progress=False) for i in idx]
    got = got[:, np.argsort(vorder)]
    rel = float(np.abs(got - ref.double().numpy()).max() / np.abs(ref.double().numpy()).max())
    return {"n_train": n_train, "n_valid": n_valid, "autograd_s_per_train": t_grad / n_train,
            "forward_only_s_per_train": t_fwd / n_train, "speedup": t_grad / t_fwd, "max_rel_diff": rel}


def _float16(feats: list) -> list:
    """Copies of sparse features whose rows (and hard rows) are rounded to float16 and back: feature
    format 5's stored rows."""
    import copy

    out = copy.deepcopy(feats)
    for f in out:
        f.rows = f.rows.astype(np.float16).astype(np.float32)
        if f.hard is not None:
            f.hard.rows = f.hard.rows.astype(np.float16).astype(np.float32)
    return out


def bench_stored_fidelity(lm, settings: Settings, data: Path, limit: int | None, sets: list[str]) -> list[dict]:
    """The default sparse rows in the stored form (feature format 6, int8 steps with a scale per support
    entry: :func:`stored_features`) and in format 5's float16 against the float32 rows and exact, from one
    forward pass per set and loss mode."""
    import copy

    out = []
    for name in sets:
        train, tcls, valid, vcls = load_set(data, name, limit)
        for loss_on in ("all", "response"):
            ex = settings.extract.model_copy(update={"loss_on": loss_on})
            ph = projections(ex, lm.hidden_size, lm.vocab_size)[0]
            enc_t = encode_samples(lm.tokenizer, train, loss_on, ex.max_length)
            enc_v = encode_samples(lm.tokenizer, valid, loss_on, ex.max_length)
            vparts = list(iter_token_blocks(lm, enc_v, ex, valid, progress=False))
            inv = np.argsort([i for idx, _ in vparts for i in idx])
            vblock = TokenBlock.concat([b for _, b in vparts])
            v32 = [f for _, b in vparts for f in sparse_features(b, ex.support_k, ph, None)]
            v32 = [v32[i] for i in inv]
            v16 = _float16(v32)
            v8 = stored_features(copy.deepcopy(v32), ex)
            exact, s32, s16, s8 = (np.zeros((len(train), len(valid))) for _ in range(4))
            t_store = 0.0
            for idx, block in iter_token_blocks(lm, enc_t, ex, train, progress=True, desc=f"stored {name} {loss_on}"):
                exact[idx] = exact_cross(block, vblock).numpy()[:, inv]
                f32 = sparse_features(block, ex.support_k, ph, None)
                s32[idx] = sparse_cross(f32, v32, lm.vocab_size)
                s16[idx] = sparse_cross(_float16(f32), v16, lm.vocab_size)
                t1 = time.perf_counter()
                f8 = stored_features(copy.deepcopy(f32), ex)
                t_store += time.perf_counter() - t1
                s8[idx] = sparse_cross(f8, v8, lm.vocab_size)
            row = {"set": name, "loss_on": loss_on, "n_train": len(train), "n_valid": len(valid)}
            for label, v in (("exact", exact), ("float32", s32), ("float16", s16), ("int8", s8)):
                ident = identification(v, tcls, vcls)
                row[f"{label}_auc"], row[f"{label}_recall@90"] = ident["auc"], ident["recall@90"]
                if label != "exact":
                    row[f"{label}_spearman"] = spearman_cols(v, exact)
            row["float16_vs_float32_max_rel"] = float(np.abs(s16 - s32).max() / np.abs(s32).max())
            row["float16_vs_float32_spearman"] = spearman_cols(s16, s32)
            row["int8_vs_float32_max_rel"] = float(np.abs(s8 - s32).max() / np.abs(s32).max())
            row["int8_vs_float32_spearman"] = spearman_cols(s8, s32)
            row["stored_form_s_per_sample"] = t_store / len(train)
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--quick", action="store_true", help="a tenth of the data (a smoke run)")
    ap.add_argument("--only", choices=["effectiveness", "speed", "oracle", "stored"], default=None)
    ap.add_argument("--sets", default=",".join(SETS), help="stored: comma-separated DataInf sets")
    ap.add_argument("--limit", type=int, default=None, help="stored: training samples per set (all: None)")
    a = ap.parse_args()
    if not (a.data / "grammars_train.jsonl").exists():
        raise SystemExit(f"benchmark data not found in {a.data} (give --data DIR)")
    limit = 90 if a.quick else None
    settings = default_settings()
    lm = load_model(settings.model)
    out = {"machine": machine(), "model": lm.name, "defaults": settings.extract.model_dump(), "quick": a.quick}
    if a.only in (None, "speed"):
        out["speed"] = [bench_speed(lm, settings, a.data, limit or 300, lo) for lo in ("all", "response")]
        print(json.dumps(out["speed"]))
    if a.only in (None, "oracle"):
        out["oracle_gap"] = bench_oracle_gap(lm, settings, a.data)
        print(json.dumps(out["oracle_gap"]))
    if a.only in (None, "effectiveness"):
        out.update(bench_effectiveness_fidelity(lm, settings, a.data, limit))
    if a.only == "stored":
        out["stored"] = bench_stored_fidelity(lm, settings, a.data, a.limit or limit, a.sets.split(","))
    out["peak_rss_mb"] = peak_rss_mb()
    a.out.mkdir(parents=True, exist_ok=True)
    name = "engine" + ("-quick" if a.quick else "") + (f"-{a.only}" if a.only else "")
    (a.out / f"{name}.json").write_text(json.dumps(out, indent=1))
    from tests.benchmarks.tables import print_engine_tables

    print_engine_tables(out)


if __name__ == "__main__":
    main()
