"""The GPU benchmark, one prepared command for a machine with a CUDA GPU and no network (``make bench-gpu``).

    python -m tests.benchmarks.bench_gpu [--out bench-results/gpu] [--datainf DIR]

Nothing is fetched: Hugging Face runs offline and the embedded default model must be cached already
(``make model`` while online, or ``VALUEGATE_HOME`` pointing at a cache copied there; the command says so
and stops otherwise). It runs, each in its own process, writing JSON under ``--out``:

1. ``bench_extract`` in bfloat16 (the default on CUDA) and in float32: ``valuegate extract`` end to end
   against a bare forward, on DataInf grammars (``--datainf``, when present) and the GSM8K sample;
2. ``bench_extract --only startup``: a one-off ``valuegate.score`` and the second call in the same process.

The agreement of bfloat16 and float16 scores with float32 is a test on the CPU
(``tests/engine/test_half_precision.py``): the GPU runs the same dtypes through the same code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.bench_extract import DATAINF


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/gpu")
    ap.add_argument("--datainf", default=str(DATAINF), help="folder of the DataInf JSONL files (optional)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PIP_NO_INDEX": "1"}
    os.environ.update(env)
    import torch

    from valuegate.default_model import default_model_cached, default_model_dir

    if not torch.cuda.is_available():
        print("bench-gpu: torch sees no CUDA device (install a CUDA build of torch: make install TORCH=torch)",
              file=sys.stderr)
        return 2
    if not default_model_cached():
        print(f"bench-gpu: the default model is not cached at {default_model_dir()}; run `make model` while "
              "online first (nothing is fetched here)", file=sys.stderr)
        return 2
    print(f"bench-gpu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    common = ["--rows", str(a.rows), "--rounds", str(a.rounds), "--datainf", a.datainf]
    runs = [["--dtype", "bfloat16", "--out", str(Path(a.out) / "bfloat16"), *common],
            ["--dtype", "float32", "--out", str(Path(a.out) / "float32"), *common],
            ["--only", "startup", "--out", a.out]]
    for args in runs:
        print(f"\n$ python -m tests.benchmarks.bench_extract {' '.join(args)}", flush=True)
        rc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_extract", *args], env=env).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
