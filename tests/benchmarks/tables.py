"""Print benchmark results as plain tables (also used to fill the README)."""

from __future__ import annotations


def table(rows: list[dict], cols: list[str], title: str) -> str:
    """A fixed-width table of ``cols`` of ``rows``; floats with 4 significant digits."""
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def print_engine_tables(out: dict) -> None:
    """Tables of bench_engine's JSON."""
    m = out["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads); "
          f"model {out['model']}")
    if "effectiveness" in out:
        print(table(out["effectiveness"], ["set", "loss_on", "n_train", "n_valid", "exact_auc", "sparse_auc",
                                           "exact_recall@90", "sparse_recall@90", "sparse_spearman",
                                           "exact_kernel_s"], "\ninfluential-data identification"))
    if out.get("fidelity"):
        print(table(out["fidelity"], ["set", "loss_on", "support_k", "k_h", "spearman", "auc", "bytes_per_sample",
                                      "mean_support", "dropped_mass"], "\nsparse fidelity and size"))
    if "speed" in out:
        print(table(out["speed"], ["loss_on", "samples", "tokens", "bare_samples_per_s", "extract_samples_per_s",
                                   "extract_tokens_per_s", "throughput_ratio"],
                    "\nextraction speed vs bare forward (same batches)"))
    if "oracle_gap" in out:
        print(table([out["oracle_gap"]], ["n_train", "n_valid", "autograd_s_per_train",
                                          "forward_only_s_per_train", "speedup", "max_rel_diff"],
                    "\noracle gap: autograd LM-head gradients vs forward-only"))
    if "peak_rss_mb" in out:
        print(f"\npeak RSS: {out['peak_rss_mb']:.0f} MiB")
