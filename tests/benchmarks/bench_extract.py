"""``valuegate extract`` as a user runs it, against a bare forward over the same rows (issue 29).

    python -m tests.benchmarks.bench_extract [--rows 64] [--rounds 3] [--out bench-results] [--only startup]

On the embedded default model (SmolLM2-135M-Instruct), for short-answer rows (DataInf grammars, read from
``../shared/data/datainf``) and long-answer rows (GSM8K worked answers, ``tests/benchmarks/data``), per
round and interleaved (one process; the model loaded once, outside every timing):

- ``bare``: ``model(input_ids, attention_mask)`` (the base model and the LM head over every position) over
  the rows' prompt + response tokens, in the length-sorted batches extraction forms;
- ``bare_response``: the same over each response alone (BOS + response): what IFD's extra pass reads;
- ``extract_never`` / ``extract_always``: ``tasks.extract.extract_dataset`` into a fresh workspace, end to
  end (tokenising, every pass, the head, the sparse rows, the int8 rounding, the store writes),
  ``extract.unconditional = "never"`` and ``"always"`` (``auto`` at the defaults resolves to ``always``);
- ``uncond``: the unconditional pass alone (``engine.baselines.unconditional_losses``).

Ratios are of summed seconds over the rounds: ``extract_never / bare`` (target <= 1.05),
``extract_always / bare`` (target <= 1.05 x (1 + share), ``share`` = response-alone tokens / row tokens)
and ``uncond / (share x bare)`` (the extra pass against its share of a bare forward, target <= 1.05).

``--only startup``: a one-off ``valuegate.score`` of 8 GSM8K rows against 8 others in a fresh process (import,
tokenising, model load, the passes), then a second call in the same process (the model kept loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from tests.benchmarks.tables import cpu_name, table, write_json
from valuegate.api import Workspace
from valuegate.engine.baselines import encode_unconditional, unconditional_losses
from valuegate.engine.encoding import length_batches
from valuegate.engine.extraction import pad_batch
from valuegate.engine.model import encode_samples, load_model
from valuegate.inputs.rows import read_samples
from valuegate.settings import default_settings
from valuegate.tasks.extract import extract_dataset

HERE = Path(__file__).resolve().parent
DATAINF = HERE.parents[2] / "shared" / "data" / "datainf"
SETS = {"datainf grammars (short answers)": DATAINF / "grammars_train.jsonl",
        "gsm8k (worked answers)": HERE / "data" / "gsm8k_sample.jsonl"}


def _sync(lm) -> None:
    """Wait for the GPU's queued work (a CUDA timing is of the work, not of its launch)."""
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def _bare(lm, encoded, ex) -> float:
    """Seconds of ``model(**batch)`` over ``encoded`` in extraction's length-sorted batches."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    t = 0.0
    for batch in length_batches([len(e.input_ids) for e in encoded], ex.batch_size, ex.max_batch_tokens):
        ids, mask = pad_batch([encoded[i] for i in batch], pad, lm.device)
        _sync(lm)
        t0 = time.perf_counter()
        with torch.inference_mode():
            lm.model(input_ids=ids, attention_mask=mask)
        _sync(lm)
        t += time.perf_counter() - t0
    return t


def _extract(lm, rows_file: Path, settings, unconditional: str) -> float:
    """Seconds of ``extract_dataset`` of ``rows_file`` into a fresh workspace (ingest not timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        ws.ingest("train", rows_file)
        s = settings.model_copy(update={"extract": settings.extract.model_copy(
            update={"unconditional": unconditional})})
        t0 = time.perf_counter()
        rep = extract_dataset(ws.store, "train", s, progress=False, lm_cache={"lm": lm}, tokenizer=lm.tokenizer)
        t = time.perf_counter() - t0
        assert rep.extracted == rep.requested, rep.line()
        return t


def bench_set(lm, settings, name: str, path: Path, rows: int, rounds: int) -> dict:
    """The timings of one set (see the module docstring)."""
    ex = settings.extract
    _, samples = read_samples(str(path))
    samples = samples[:rows]
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps({"prompt": s.prompt, "response": s.response}) + "\n"
                                     for s in samples))
        enc = encode_samples(lm.tokenizer, samples, ex.loss_on, ex.max_length)
        resp = [e for e in (encode_unconditional(lm.tokenizer, s, ex.max_length) for s in samples) if e is not None]
        tokens, resp_tokens = sum(len(e.input_ids) for e in enc), sum(len(e.input_ids) for e in resp)
        share = resp_tokens / tokens
        _bare(lm, enc[:8], ex)  # warm-up
        t = {k: 0.0 for k in ("bare", "bare_response", "extract_never", "extract_always", "uncond")}
        for _ in range(rounds):
            t["bare"] += _bare(lm, enc, ex)
            t["extract_never"] += _extract(lm, rows_file, settings, "never")
            t0 = time.perf_counter()
            unconditional_losses(lm, samples, ex, progress=False)
            t["uncond"] += time.perf_counter() - t0
            t["bare_response"] += _bare(lm, resp, ex)
            t["extract_always"] += _extract(lm, rows_file, settings, "always")
    n = len(samples) * rounds
    return {"set": name, "rows": len(samples), "rounds": rounds, "tokens": tokens,
            "response_tokens": resp_tokens, "share": share,
            **{f"{k}_s": v / rounds for k, v in t.items()},
            "bare_tok_per_s": tokens * rounds / t["bare"],
            "extract_never_tok_per_s": tokens * rounds / t["extract_never"],
            "extract_always_tok_per_s": tokens * rounds / t["extract_always"],
            "extract_never_samples_per_s": n / t["extract_never"],
            "never_x_bare": t["extract_never"] / t["bare"],
            "always_x_bare": t["extract_always"] / t["bare"],
            "always_target": 1.05 * (1 + share),
            "uncond_x_share": t["uncond"] / (share * t["bare"]),
            "uncond_x_bare_response": t["uncond"] / t["bare_response"]}


STARTUP = """
import json, sys, time
t0 = time.perf_counter()
import valuegate
from valuegate.api import resolve_settings, score_inputs
t_import = time.perf_counter() - t0
rows, valid = sys.argv[1], sys.argv[2]
s = resolve_settings(None, None, {})
out = {"import_s": t_import}
for call in ("first", "second"):
    t0 = time.perf_counter()
    _, vm = score_inputs(rows, valid, s)
    out[call] = {"total_s": time.perf_counter() - t0, **{k: round(v, 3) for k, v in vm.timings.items()}}
print(json.dumps(out))
"""


def bench_startup(path: Path, rows: int = 8) -> dict:
    """A one-off ``valuegate.score`` of ``rows`` rows against ``rows`` others in a fresh process, then a second
    call in that process: seconds of the import, tokenising, the model load, the passes (first batch
    included) and in all."""
    import subprocess
    import sys

    _, samples = read_samples(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, part in (("train", samples[:rows]), ("valid", samples[rows:2 * rows])):
            f = Path(tmp) / f"{name}.jsonl"
            f.write_text("".join(json.dumps({"prompt": x.prompt, "response": x.response}) + "\n" for x in part))
            files.append(str(f))
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", STARTUP, *files], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
    return {"rows": rows, "process_wall_s": wall, **json.loads(res.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--dtype", default="auto", help="model.dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--datainf", default=str(DATAINF), help="folder of the DataInf JSONL files")
    ap.add_argument("--only", choices=["extract", "startup"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's); "
                    "on a machine whose cores other processes share, 1 avoids OpenMP's waits on preempted threads")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.only == "startup":
        res = bench_startup(SETS["gsm8k (worked answers)"])
        print(json.dumps(res, indent=1))
        write_json(a.out, "bench_startup", res)
        return
    settings = default_settings()
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"dtype": a.dtype})})
    t0 = time.perf_counter()
    lm = load_model(settings.model, progress=False)
    load_s = time.perf_counter() - t0
    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "device": str(lm.device), "dtype": str(lm.model.dtype)},
           "model": settings.model.name, "model_load_s": load_s, "sets": []}
    sets = {**SETS, "datainf grammars (short answers)": Path(a.datainf) / "grammars_train.jsonl"}
    for name, path in sets.items():
        if not path.exists():
            print(f"skipped {name}: {path} not found")
            continue
        out["sets"].append(bench_set(lm, settings, name, path, a.rows, a.rounds))
        print(json.dumps(out["sets"][-1]), flush=True)
    m = out["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), {m['device']} {m['dtype']}; "
          f"model {out['model']}")
    print(table(out["sets"], ["set", "rows", "tokens", "share", "bare_tok_per_s", "extract_never_tok_per_s",
                              "extract_always_tok_per_s", "never_x_bare", "always_x_bare", "always_target",
                              "uncond_x_share", "uncond_x_bare_response"],
                "\nvaluegate extract end to end against a bare forward (ratios of seconds)"))
    write_json(a.out, "bench_extract", out)


if __name__ == "__main__":
    main()
