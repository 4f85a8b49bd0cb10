"""Does selection pay? LoRA fine-tuning of the default model on the demo data, with and without valuegate.

    .venv/bin/python -m tests.benchmarks.bench_selection [--release DIR] [--steps N] [--seeds 0,1,2] [--quick]

The embedded default model (SmolLM2-135M-Instruct, ``valuegate fetch-model``) gets a fresh LoRA adapter
(r=8 on q/k/v/o, float32 on CPU) and is fine-tuned for the same number of steps (batch 16, AdamW, linear
warm-up then decay, loss on the response tokens only, prompt masked) on each of:

- ``full``: the whole corrupted demo training set (``infra/demo/data/train.jsonl``, 400 rows, 20 % with a
  corrupted response: ``swap``, ``copy`` or ``wrong``; duplicates included, as the file has them);
- ``valuegate``: the rows of a valuegate release (``--release DIR``, or by default the current release of a
  fresh ``valuegate run`` of ``infra/demo/demo.toml`` in a temporary workspace, i.e. whatever selection
  policy that config names today), mapped back to the training rows by (prompt, response) content;
- ``random``: a random subset (seeded per seed) of the same size, drawn from the same pool valuegate
  chooses from (the distinct (prompt, response) contents of the file: ingestion deduplicates);
- ``oracle clean``: the distinct rows whose ``corruption`` is ``""``; an upper bound that reads the labels,
  not a method.

The labels are never used by the selection: the ``corruption`` column is only counted (how many corrupted
rows each training set holds). For every seed the adapter initialisation (``torch.manual_seed``) and the
data order (a seeded permutation per epoch) are fixed; ``random`` draws a new subset per seed.

Metrics, on the clean validation set (``infra/demo/data/valid.jsonl``, 60 rows, 4 task families):

- ``val_loss``: mean token NLL over all response tokens of the set (tokens pooled, prompt masked; the
  tokenisation and response mask are valuegate's own, :func:`valuegate.engine.model.encode_sample`);
- ``exact_match``: share of rows whose teacher-forced argmax equals the target at every response token,
  i.e. greedy decoding from the prompt reproduces the reference response token for token (it does not check
  that the model stops afterwards: the response tokens carry no EOS).

Prints a table (mean ± std over seeds) and the differences valuegate − full and valuegate − random, and
writes everything (per-seed runs included) to ``<out>/selection.json`` (``selection-quick.json`` with
``--quick``). Defaults: 60 steps, lr 2e-3 (the best of 1e-3, 2e-3, 4e-3 on ``full`` alone, seed 0), one
torch thread: a step (16 rows of ~15 tokens, forward + backward through all 30 layers) costs ~1.8-2.1 s
on one core of the shared 2-core machine, where two OpenMP threads spun to 3-50 s per step whenever other
jobs were running; 4 conditions × 3 seeds then take ~25 minutes. ``--quick``: seed 0, 4 steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import polars as pl
import torch

from tests.benchmarks.bench_engine import machine, peak_rss_mb
from tests.benchmarks.tables import table
from valuegate.engine.encoding import EncodedSample
from valuegate.engine.extraction import pad_batch
from valuegate.engine.model import encode_samples
from valuegate.inputs.rows import read_samples

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "infra" / "demo"
TRAIN = DEMO / "data" / "train.jsonl"
VALID = DEMO / "data" / "valid.jsonl"
MAX_LENGTH = 128  # demo rows are < 40 tokens
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONDITIONS = ("full", "valuegate", "random", "oracle clean")


# --------------------------------------------------------------------------------------------------
# The kept set: a release folder, or a fresh demo run.
# --------------------------------------------------------------------------------------------------

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_dump(d: dict, prefix: str = "") -> str:
    """A minimal TOML writer (scalars, lists of scalars, nested tables): enough for valuegate configs."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", _toml_dump(v, f"{prefix}{k}.")]
    return "\n".join(lines)


def demo_config(config: Path, workspace: Path) -> dict:
    """The resolved settings of ``config`` with the workspace replaced and the data paths made absolute
    (relative paths in the demo config are relative to the repository root)."""
    from valuegate.settings import load_settings

    cfg = load_settings(config).model_dump(mode="json")
    cfg["workspace"] = str(workspace)
    data = cfg["data"]

    def absolute(p: str) -> str:
        return p if "://" in p or Path(p).is_absolute() else str((ROOT / p).resolve())

    data["sources"] = [absolute(p) for p in data.get("sources", [])]
    if data.get("valset_file"):
        data["valset_file"] = absolute(data["valset_file"])
    return cfg


def run_demo(config: Path, tmp: Path) -> tuple[Path, dict]:
    """``valuegate run`` of ``config`` in a workspace under ``tmp``; the current release's folder and facts."""
    cfg = demo_config(config, tmp / "workspace")
    cfg_file = tmp / "demo.toml"
    cfg_file.write_text(_toml_dump(cfg) + "\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "valuegate.cli", "run", "--config", str(cfg_file), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"valuegate run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    name = cfg.get("release", {}).get("name", "default")
    rel = Path(cfg["workspace"]) / "releases" / name
    from valuegate.storage.releases import read_current

    version = read_current(cfg["workspace"], name)
    if version is None:
        raise SystemExit(f"valuegate run made no current release under {rel} (gate failed?):\n"
                         f"{(proc.stdout + proc.stderr)[-4000:]}")
    return rel / version, {"config": str(config), "select": cfg.get("select", {}), "run_s": secs,
                           "release": name, "version": version}


def _key(prompt: str | None, response: str | None) -> tuple[str, str]:
    """Content key as ingestion normalises it (NFC, CRLF → LF)."""
    def norm(s):
        return unicodedata.normalize("NFC", (s or "").replace("\r\n", "\n"))
    return norm(prompt), norm(response)


def kept_rows(release: Path, train: pl.DataFrame) -> list[int]:
    """Training-row indices (first occurrence of each content) of the rows a release kept."""
    data = pl.read_parquet(release / "data.parquet", columns=["id", "prompt", "response"])
    first: dict[tuple[str, str], int] = {}
    for i, (p, r) in enumerate(zip(train["prompt"], train["response"], strict=True)):
        first.setdefault(_key(p, r), i)
    rows, missing = [], 0
    for p, r in zip(data["prompt"], data["response"], strict=True):
        i = first.get(_key(p, r))
        if i is None:
            missing += 1
        else:
            rows.append(i)
    if missing:
        raise SystemExit(f"{release}: {missing} of {data.height} kept rows are not in {TRAIN}")
    return sorted(set(rows))


# --------------------------------------------------------------------------------------------------
# Fine-tuning and evaluation.
# --------------------------------------------------------------------------------------------------

def batch_tensors(items: list[EncodedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and the (B, T-1) mask of counted (response) predictions."""
    ids, mask = pad_batch(items, pad_id, torch.device("cpu"))
    counted = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    for b, e in enumerate(items):
        counted[b, :len(e.counted)] = torch.from_numpy(e.counted)
    return ids, mask, counted


def response_loss(model, ids: torch.Tensor, mask: torch.Tensor, counted: torch.Tensor):
    """Token-mean NLL over the counted (response) predictions, their per-token NLL and argmax hits.

    The LM head runs on the counted positions only (a fifth of the tokens here): the same loss as masking
    full-sequence logits, at a fraction of the head's cost (49k-word vocabulary).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][counted]
    logits = base.get_output_embeddings()(hidden).float()
    targets = ids[:, 1:][counted]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return nll.mean(), nll, logits.argmax(-1) == targets


@torch.no_grad()
def evaluate(model, enc: list[EncodedSample], families: list[str], pad_id: int, batch: int = 32) -> dict:
    model.eval()
    nll_sum, n_tok, hits = 0.0, 0, []
    for lo in range(0, len(enc), batch):
        items = enc[lo:lo + batch]
        ids, mask, counted = batch_tensors(items, pad_id)
        _, nll, right = response_loss(model, ids, mask, counted)
        nll_sum += float(nll.sum())
        n_tok += len(nll)
        owner = torch.arange(len(items)).unsqueeze(1).expand_as(counted)[counted]  # sample of each position
        hits += [bool(right[owner == b].all()) for b in range(len(items))]
    per_family = {f: float(np.mean([h for h, g in zip(hits, families, strict=True) if g == f]))
                  for f in sorted(set(families))}
    return {"val_loss": nll_sum / n_tok, "exact_match": float(np.mean(hits)), "exact_match_family": per_family,
            "val_tokens": n_tok}


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def finetune(model_dir: Path, enc: list[EncodedSample], rows: list[int], seed: int, a, pad_id: int):
    """A fresh LoRA adapter trained ``a.steps`` steps on ``rows``; returns the model and the losses seen."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base(model_dir), LoraConfig(
        r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (a.steps - s) / max(1, a.steps - warm)))
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(a.steps):
        while len(order) < a.batch:
            order += [rows[i] for i in rng.permutation(len(rows))]
        take, order = order[:a.batch], order[a.batch:]
        ids, mask, counted = batch_tensors([enc[i] for i in take], pad_id)
        loss, _, _ = response_loss(model, ids, mask, counted)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model, losses


# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------

def _ms(xs: list[float], digits: int = 4) -> str:
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return f"{np.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def summarise(runs: list[dict], base: dict) -> tuple[list[dict], list[dict]]:
    summary = []
    for c in CONDITIONS:
        rs = [r for r in runs if r["condition"] == c]
        if not rs:
            continue
        loss, em = [r["val_loss"] for r in rs], [r["exact_match"] for r in rs]
        summary.append({
            "condition": c + (" (upper bound)" if c == "oracle clean" else ""), "key": c,
            "train_rows": round(float(np.mean([r["train_rows"] for r in rs]))),
            "corrupted": _ms([r["corrupted"] for r in rs], 0) if c == "random" else rs[0]["corrupted"],
            "val_loss": _ms(loss), "exact_match": _ms(em, 3), "val_loss_mean": float(np.mean(loss)),
            "val_loss_std": float(np.std(loss, ddof=1)) if len(rs) > 1 else 0.0,
            "exact_match_mean": float(np.mean(em)), "exact_match_std": float(np.std(em, ddof=1)) if len(rs) > 1 else 0.0,
            "exact_match_family": {f: float(np.mean([r["exact_match_family"][f] for r in rs]))
                                   for f in rs[0]["exact_match_family"]},
            "epochs": float(np.mean([r["epochs"] for r in rs])), "seconds": float(np.mean([r["seconds"] for r in rs])),
            "seeds": len(rs)})
    by = {s["key"]: s for s in summary}
    comps = []
    for other in ("full", "random"):
        if "valuegate" not in by or other not in by:
            continue
        b, o = by["valuegate"], by[other]
        seeds = sorted({r["seed"] for r in runs})
        pick = {(r["condition"], r["seed"]): r for r in runs}
        d_loss = [pick["valuegate", s]["val_loss"] - pick[other, s]["val_loss"] for s in seeds]
        d_em = [pick["valuegate", s]["exact_match"] - pick[other, s]["exact_match"] for s in seeds]
        comps.append({
            "comparison": f"valuegate - {other}",
            "d_val_loss": float(np.mean(d_loss)), "d_val_loss_per_seed": d_loss,
            "loss_spread": b["val_loss_std"] + o["val_loss_std"],
            "loss_better_beyond_spread": None if len(seeds) < 2 else bool(-np.mean(d_loss) > b["val_loss_std"] + o["val_loss_std"]),
            "d_exact_match": float(np.mean(d_em)), "d_exact_match_per_seed": d_em,
            "em_spread": b["exact_match_std"] + o["exact_match_std"],
            "em_better_beyond_spread": None if len(seeds) < 2 else bool(np.mean(d_em) > b["exact_match_std"] + o["exact_match_std"])})
    summary.insert(0, {"condition": "base model (no fine-tuning)", "key": "base", "train_rows": 0,
                       "corrupted": 0, "val_loss": f"{base['val_loss']:.4f}",
                       "exact_match": f"{base['exact_match']:.3f}", "val_loss_mean": base["val_loss"],
                       "exact_match_mean": base["exact_match"], "exact_match_family": base["exact_match_family"],
                       "epochs": 0.0, "seconds": 0.0})
    return summary, comps


def print_selection_tables(out: dict) -> None:
    m = out["machine"]
    sel = out["selection"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads); "
          f"model {out['model']}")
    print(f"kept set: {sel['source']} ({sel.get('version', '')}; select {json.dumps(sel.get('select', {}))}): "
          f"{sel['kept']} of {sel['pool']} distinct training contents")
    t = out["training"]
    print(f"LoRA r={t['rank']} on {','.join(TARGETS)}, lr {t['lr']:g}, batch {t['batch']}, {t['steps']} steps, "
          f"seeds {t['seeds']}; exact match = teacher-forced argmax equals every response token")
    rows = [{**s, "epochs": f"{s['epochs']:.1f}", "seconds": f"{s['seconds']:.0f}"} for s in out["summary"]]
    print(table(rows, ["condition", "train_rows", "corrupted", "epochs", "val_loss", "exact_match", "seconds"],
                "\nclean validation set, mean ± std over seeds (seconds: per run)"))
    fams = list(out["summary"][0]["exact_match_family"])
    print(table([{"condition": s["condition"], **{f: f"{s['exact_match_family'][f]:.3f}" for f in fams}}
                 for s in out["summary"]], ["condition", *fams], "\nexact match per task family (mean over seeds)"))
    if out["comparisons"]:
        print(table([{**c, "d_val_loss_per_seed": " ".join(f"{x:+.4f}" for x in c["d_val_loss_per_seed"]),
                      "d_exact_match_per_seed": " ".join(f"{x:+.3f}" for x in c["d_exact_match_per_seed"])}
                     for c in out["comparisons"]],
                    ["comparison", "d_val_loss", "d_val_loss_per_seed", "loss_spread", "loss_better_beyond_spread",
                     "d_exact_match", "d_exact_match_per_seed", "em_spread", "em_better_beyond_spread"],
                    "\ndifferences (same seed paired; 'beyond spread': the mean gain exceeds the sum of the two stds; "
                    "None with one seed)"))
    print(f"\npeak RSS: {out['peak_rss_mb']:.0f} MiB; wall {out['wall_s'] / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", type=Path, default=None, help="release folder with data.parquet (default: "
                    "run the demo config in a temporary workspace and take its current release)")
    ap.add_argument("--config", type=Path, default=DEMO / "demo.toml", help="config run when no --release")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; 4 quick)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; 0 quick)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (default 2e-3: "
                    "best of 1e-3, 2e-3, 4e-3 for `full`, seed 0, 60 steps)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                    "machine two spinning OpenMP threads ran 2-20x slower per step than one)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated subset of "
                    + ", ".join(CONDITIONS))
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--quick", action="store_true", help="one seed, a few steps (a smoke run)")
    a = ap.parse_args()
    a.steps = a.steps or (4 if a.quick else 60)
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    conditions = [c.strip() for c in a.conditions.split(",")]
    if bad := [c for c in conditions if c not in CONDITIONS]:
        raise SystemExit(f"unknown conditions {bad}; choose from {CONDITIONS}")
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    from transformers import AutoTokenizer

    from valuegate.default_model import ensure_default_model

    model_dir = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    train_df, train_samples = read_samples(TRAIN)
    valid_df, valid_samples = read_samples(VALID)
    enc_t = encode_samples(tok, train_samples, "response", MAX_LENGTH)
    enc_v = encode_samples(tok, valid_samples, "response", MAX_LENGTH)
    corrupt = (train_df["corruption"].fill_null("") != "").to_numpy()
    keys = [_key(p, r) for p, r in zip(train_df["prompt"], train_df["response"], strict=True)]
    pool = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())  # first occurrences

    with tempfile.TemporaryDirectory(prefix="bench-selection-") as tmp:
        if a.release is not None:
            kept = kept_rows(a.release, train_df)
            sel = {"source": str(a.release)}
        else:
            release, facts = run_demo(a.config, Path(tmp))
            kept = kept_rows(release, train_df)
            sel = {"source": f"valuegate run --config {a.config.relative_to(ROOT) if a.config.is_relative_to(ROOT) else a.config}",
                   **facts}
    sel.update({"kept": len(kept), "pool": len(pool), "kept_corrupted": int(corrupt[kept].sum()),
                "pool_corrupted": int(corrupt[pool].sum())})
    print(f"kept set: {len(kept)} of {len(pool)} distinct contents; corrupted {sel['kept_corrupted']} "
          f"(pool {sel['pool_corrupted']}); {json.dumps(sel.get('select', {}))}", flush=True)

    def rows_for(cond: str, seed: int) -> list[int]:
        if cond == "full":
            return list(range(len(enc_t)))
        if cond == "valuegate":
            return kept
        if cond == "random":
            rng = np.random.default_rng([seed, 1])
            return sorted(int(i) for i in rng.choice(pool, size=len(kept), replace=False))
        return [i for i in pool if not corrupt[i]]

    families = valid_df["family"].to_list()
    base = evaluate(load_base(model_dir), enc_v, families, pad_id)
    print(f"base model: val_loss {base['val_loss']:.4f}, exact match {base['exact_match']:.3f}", flush=True)
    runs = []
    for seed in seeds:
        for cond in conditions:
            rows = rows_for(cond, seed)
            t0 = time.perf_counter()
            model, losses = finetune(model_dir, enc_t, rows, seed, a, pad_id)
            t_train = time.perf_counter() - t0
            ev = evaluate(model, enc_v, families, pad_id)
            del model
            run = {"condition": cond, "seed": seed, "train_rows": len(rows), "corrupted": int(corrupt[rows].sum()),
                   "epochs": a.steps * a.batch / len(rows), **ev, "train_loss_first": float(np.mean(losses[:5])),
                   "train_loss_last": float(np.mean(losses[-5:])), "train_s": t_train,
                   "s_per_step": t_train / a.steps, "seconds": time.perf_counter() - t0}
            runs.append(run)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items()
                              if k != "exact_match_family"}), flush=True)
    summary, comps = summarise(runs, base)
    out = {"machine": machine(), "model": str(model_dir), "quick": a.quick, "selection": sel,
           "training": {"rank": a.rank, "alpha": 2 * a.rank, "targets": TARGETS, "lr": a.lr, "batch": a.batch,
                        "steps": a.steps, "warmup": max(1, a.steps // 10), "schedule": "linear warm-up, linear decay",
                        "seeds": seeds, "max_length": MAX_LENGTH, "grad_clip": 1.0,
                        "threads": a.threads},
           "metrics": {"val_loss": "mean token NLL over the response tokens of the validation set (pooled)",
                       "exact_match": "teacher-forced argmax equals the target at every response token"},
           "base": base, "runs": runs, "summary": summary, "comparisons": comps,
           "peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t_start}
    a.out.mkdir(parents=True, exist_ok=True)
    name = "selection" + ("-quick" if a.quick else "")
    (a.out / f"{name}.json").write_text(json.dumps(out, indent=1))
    print_selection_tables(out)


if __name__ == "__main__":
    main()
