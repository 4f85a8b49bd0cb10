"""The ``valuegate`` command line. User errors print one line and exit 2, without a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from valuegate import __version__
from valuegate.errors import ValuegateError

EXIT_USER_ERROR = 2


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub id, local directory, or 'smollm2-135m' (the embedded default)")
    g.add_argument("--adapter", help="PEFT/LoRA adapter directory, merged at load")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="run model code from the hub repository (off by default)")


def _add_extract_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("extraction")
    g.add_argument("--loss-on", choices=["auto", "response", "all"],
                   help="tokens that count: response (default for prompt/response and chat) or all")
    g.add_argument("--max-length", type=int, help="tokens per sample (cut at the end)")
    g.add_argument("--batch-size", type=int, help="samples per forward pass")
    g.add_argument("--support-k", type=int, help="sparse: top-k predictions per position in the support")
    g.add_argument("--hidden-dim", type=int, help="sparse: projection width k_h of h (0 = exact h)")
    g.add_argument("--seed", type=int, help="seed of the projections")
    g.add_argument("--lowest-likelihood-ratio", type=float,
                   help="value train samples on this fraction of their hardest counted tokens")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="valuegate", description="Forward-only data valuation (For-Value) "
                                 "of LLM fine-tuning data.")
    ap.add_argument("--version", action="version", version=f"valuegate {__version__}")
    ap.add_argument("--config", help="TOML settings file (flags override it; env vars VALUEGATE_* too)")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="value every sample of TRAIN against the validation set VALID",
                       description="Value every sample of TRAIN against VALID (JSONL, Parquet or CSV with "
                       "prompt+response, messages, or text) and write a Parquet table.")
    s.add_argument("train", help="training file")
    s.add_argument("valid", help="validation file")
    s.add_argument("--out", required=True, help="output .parquet file")
    _add_model_flags(s)
    _add_extract_flags(s)
    g = s.add_argument_group("scoring")
    g.add_argument("--method", choices=["sparse", "exact"], help="sparse (default) or exact (oracle)")
    g.add_argument("--aggregate", choices=["mean", "nearest", "pairwise"])
    g.add_argument("--nearest-k", type=int, help="k of the nearest aggregate")
    g.add_argument("--normalize", choices=["none", "length", "cosine"])
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("fetch-model", help="fetch and convert the embedded default model into the cache")
    f.add_argument("--home", help="cache directory (default $VALUEGATE_HOME or ~/.cache/valuegate)")
    return ap


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    g = vars(args).get
    return {
        "model": {"name": g("model"), "adapter": g("adapter"), "dtype": g("dtype"), "device": g("device"),
                  "trust_remote_code": g("trust_remote_code")},
        "extract": {"loss_on": g("loss_on"), "max_length": g("max_length"), "batch_size": g("batch_size"),
                    "support_k": g("support_k"), "hidden_dim": g("hidden_dim"), "seed": g("seed"),
                    "lowest_likelihood_ratio": g("lowest_likelihood_ratio")},
        "score": {"method": g("method"), "aggregate": g("aggregate"), "nearest_k": g("nearest_k"),
                  "normalize": g("normalize")},
    }


def _cmd_score(args: argparse.Namespace) -> int:
    from valuegate.settings import load_settings
    from valuegate.tasks.score import score_files, summary_line

    settings = load_settings(args.config, _overrides(args))
    out = Path(args.out)
    if out.suffix.lower() != ".parquet":
        raise ValuegateError(f"--out {out}: the output is Parquet; give a path ending in .parquet")
    if not out.parent.exists():
        raise ValuegateError(f"--out {out}: directory {out.parent} does not exist")
    df, vm = score_files(args.train, args.valid, settings, progress=not args.quiet)
    tmp = out.with_name(f".{out.name}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, out)  # never leave a half-written output under the final name
    print(summary_line(df, vm, settings, str(out)), file=sys.stderr)
    return 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from valuegate.tasks.default_model import ensure_default_model

    path = ensure_default_model(Path(args.home) if args.home else None)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``valuegate`` console script."""
    args = _parser().parse_args(argv)
    handlers = {"score": _cmd_score, "fetch-model": _cmd_fetch_model}
    try:
        return handlers[args.command](args)
    except ValuegateError as exc:
        print(f"valuegate: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("valuegate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
