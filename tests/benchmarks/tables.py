"""Print benchmark results as plain tables (also used to fill docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path


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
    if out.get("stored"):
        print(table(out["stored"], ["set", "loss_on", "exact_auc", "float32_auc", "float16_auc", "int8_auc",
                                    "float32_spearman", "float16_spearman", "int8_spearman",
                                    "float16_vs_float32_max_rel", "int8_vs_float32_max_rel"],
                    "\nstored rows: int8 steps with a scale per support entry (format 6) and float16 (format 5), against exact"))
    if "peak_rss_mb" in out:
        print(f"\npeak RSS: {out['peak_rss_mb']:.0f} MiB")


def print_store_tables(out: dict) -> None:
    """Tables of bench_store's JSON."""
    m = out["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads); "
          f"model {out['model']}; load average {out.get('loadavg_start')} → {out.get('loadavg_end')}")
    if "incremental" in out:
        inc = out["incremental"]
        print(table(inc["runs"], ["run", "in_dataset", "missing", "extracted", "model_loaded", "model_load_s",
                                  "model_s", "model_s_per_sample", "store_s", "wall_s", "ingest_s"],
                    "\nincremental extraction (valuegate extract after each ingest)"))
        r = inc["ratio"]
        print(f"second run / first run: samples {r['samples_ratio']:.3f}, model seconds {r['model_s_ratio']:.3f}, "
              f"model tokens {r['tokens_ratio']:.3f}, wall {r['wall_s_ratio']:.3f} "
              f"(without the model load {r['wall_minus_load_ratio']:.3f}); nothing new: "
              f"{r['noop_extracted']} extracted, model loaded: {r['noop_model_loaded']}, {r['noop_wall_s']:.2f}s")
    if "rescore" in out:
        rs = out["rescore"]
        print(table(rs["runs"], ["run", "n_train", "n_valid", "valid_extracted", "model_load_s", "valid_model_s",
                                 "extract_s", "resolve_s", "read_s", "score_s", "write_s", "scoring_only_s",
                                 "wall_s"], "\nscore_dataset against a validation version"))
        s = rs["summary"]
        print(f"v2 re-score vs the {s['train_extract_samples']}-sample training extraction "
              f"({s['train_extract_wall_s']:.1f}s wall, {s['train_extract_model_s']:.1f}s model): "
              f"scoring only {s['v2_scoring_only_s']:.2f}s = {100 * s['frac_scoring_only']:.2f}%, "
              f"everything but the validation extraction {s['v2_fixed_s']:.2f}s = {100 * s['frac_fixed']:.2f}%, "
              f"validation extraction {s['v2_valid_extract_s']:.1f}s = {100 * s['frac_valid_extract']:.1f}% "
              f"(model load {s['v2_valid_model_load_s']:.1f}s + forward {s['v2_valid_model_s']:.1f}s "
              f"+ store {s['v2_valid_extract_other_s']:.1f}s), total {s['v2_total_s']:.1f}s = "
              f"{100 * s['frac_total']:.1f}%; nearest run {s['nearest_total_s']:.2f}s "
              f"(score {s['nearest_score_s']:.2f}s)")
    if "scale" in out:
        sc = out["scale"]
        print(table(sc["overlap"], ["features", "mean_support", "p90_support", "mean_n_tokens", "distinct_ids",
                                    "mean_intersection", "mean_jaccard", "frac_pairs_overlapping"],
                    f"\nsynthetic vs real features (row width {sc['width']}, Zipf exponent {sc['zipf_a']})"))
        done = [r for r in sc["sizes"] if "skipped" not in r]
        for r in sc["sizes"]:
            if "skipped" in r:
                print(f"N={r['n']}: skipped, {r['skipped']}")
        print(table(done, ["n", "gen_s", "write_s", "rows_per_s", "disk_bytes", "bytes_per_sample",
                           "write_peak_rss_mb", "peak_rss_mb"], "\nscale: writing synthetic features"))
        print(table(done, ["n", "mean_mode", "mean_read_s", "read_nofilter_s", "mean_matrix_s",
                           "mean_aggregate_s", "mean_total_s", "mean_rss_delta_mb", "mean_one_piece_projected_mb",
                           "nearest_rows", "nearest_compute_s", "nearest_extrapolated_s", "nearest_matrix_gb"],
                    f"\nscale: scoring against {sc.get('n_valid')} synthetic validation rows"))
        p = sc.get("projection_1m") or {}
        if p:
            print(f"\nprojection to {p['n']:,} samples (NOT measured: {p['method']}; measured up to "
                  f"{p['measured_up_to']:,}):")
            if "fits_disk_limit" in p:
                print(f"  {p['n']:,} samples need ~{p['disk_bytes'] / 1e9:.1f} GB of features on disk: "
                      + ("within" if p["fits_disk_limit"] else "over")
                      + f" the {p['max_disk_gb']:g} GB limit of this run, so extrapolated, not run")
            for k, v in p.items():
                if k not in ("n", "method", "measured_up_to", "fits_disk_limit", "max_disk_gb") \
                        and not k.endswith("_exponent"):
                    e = p.get(f"{k}_exponent")
                    print(f"  {k}: {v:.4g}" + (f"  (exponent {e:.2f})" if e is not None else ""))
    if "peak_rss_mb" in out:
        print(f"\npeak RSS: {out['peak_rss_mb']:.0f} MiB; wall {out.get('wall_s', 0):.0f}s")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo ("unknown" elsewhere), for the machine line of every benchmark."""
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def write_json(out_dir: str | Path, name: str, payload: dict) -> Path:
    """Write a benchmark's results to ``<out_dir>/<name>.json`` (the folder made if missing; values JSON
    cannot hold are written as ``str``) and say where."""
    dest = Path(out_dir) / f"{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"\nwritten {dest}")
    return dest
