"""The bench's report: the ratios between rows and the printed table (benchmarks/README.md
documents every key)."""

from __future__ import annotations

from rich.table import Table

# Keys of each result row (documented in benchmarks/README.md).
RESULT_KEYS = (
    "recipe", "mode", "caption_format", "ms_per_step", "ms_mean", "ms_all", "samples_per_s", "trained_tokens_per_s", "tokens_per_s",
    "padding_fraction", "model_gflop", "useful_gflop", "mfu", "useful_mfu", "peak_alloc_mb", "peak_rss_mb",
    "step_mem_mb", "saved_mb", "losses",
)


def bench_ratios(results: list[dict]) -> dict[str, float]:
    """Ratios between rows (times: `ms_mean`, the same samples in every mode when the step
    count is a multiple of LENGTH_GROUP): `<recipe>/naive_over_optimised_time`,
    `.../optimised_over_naive_alloc_peak` (peak tensor memory), `.../optimised_over_naive_step_mem`,
    `.../optimised_over_naive_peak_rss`, `.../optimised_over_naive_saved` (activations kept
    for backward), `<recipe>/optimised_over_align_time` (joint / NTP-only),
    `<recipe>/optimised_over_plain_align_time` (over align on plain captions),
    `<recipe>/<ablation>_over_optimised_time`, and for a row in another caption format
    (`optimised-<format>`) `<recipe>/optimised-<format>_over_align_time` (align in that format)."""
    rows = {(r["recipe"], r["mode"]): r for r in results}
    out: dict[str, float] = {}
    align = rows.get(("align", "optimised"))
    plain = rows.get(("align", "optimised-plain"))

    def ratio(a: dict, b: dict, key: str) -> float:
        return a[key] / max(b[key], 1e-9)

    for (recipe, mode), r in rows.items():
        if mode == "optimised" and plain is not None:
            out[f"{recipe}/optimised_over_plain_align_time"] = ratio(r, plain, "ms_mean")
        opt = rows.get((recipe, "optimised"))
        if opt is None:
            continue
        if mode == "naive":
            out[f"{recipe}/naive_over_optimised_time"] = ratio(r, opt, "ms_mean")
            for key, name in (("peak_alloc_mb", "alloc_peak"), ("step_mem_mb", "step_mem"),
                              ("peak_rss_mb", "peak_rss"), ("saved_mb", "saved")):
                out[f"{recipe}/optimised_over_naive_{name}"] = ratio(opt, r, key)
        elif mode == "optimised" and align is not None and recipe != "align":
            out[f"{recipe}/optimised_over_align_time"] = ratio(r, align, "ms_mean")
        elif mode.startswith("optimised-") and recipe != "align" and ("align", mode) in rows:
            # the same caption format on both sides (e.g. optimised-prompted)
            out[f"{recipe}/{mode}_over_align_time"] = ratio(r, rows[("align", mode)], "ms_mean")
            out[f"{recipe}/{mode}_over_optimised_time"] = ratio(r, opt, "ms_mean")
        elif mode != "optimised":
            out[f"{recipe}/{mode}_over_optimised_time"] = ratio(r, opt, "ms_mean")
    return out


def bench_table(report: dict) -> Table:
    """The rich table `run_bench` prints."""
    table = Table(title=f"vlmalign bench: {report['llm']} + {report['tower']}, batch {report['batch_size']}, "
                        f"peak {report['peak_gflops']:.0f} GFLOP/s, load {report['load_avg_before'][0]:.1f}")
    for col in ("recipe", "mode", "captions", "ms/step", "ms mean", "samples/s", "trained tok/s", "pad", "GFLOP", "MFU",
                "useful MFU", "saved MB", "peak alloc MB", "step mem MB", "peak RSS MB"):
        table.add_column(col, justify="left" if col in ("recipe", "mode") else "right")
    for r in report["results"]:
        table.add_row(r["recipe"], r["mode"], r.get("caption_format") or "-", f"{r['ms_per_step']:.0f}", f"{r['ms_mean']:.0f}",
                      f"{r['samples_per_s']:.1f}", f"{r['trained_tokens_per_s']:.0f}", f"{r['padding_fraction']:.0%}",
                      f"{r['model_gflop']:.0f}", f"{r['mfu']:.0%}", f"{r['useful_mfu']:.0%}", f"{r['saved_mb']:.0f}",
                      f"{r['peak_alloc_mb']:.0f}", f"{r['step_mem_mb']:.0f}", f"{r['peak_rss_mb']:.0f}")
    return table
