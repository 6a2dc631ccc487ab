"""An experiment summary as a Markdown table and a plot (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path


def _fmt(x: float | None, unit: str = "%") -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if unit == "%" else f"{x:.3f}"


def markdown(summary: dict) -> str:
    """Metrics x variants (mean [95% interval], per-seed values, chance), then one row per
    claim with its difference, MDE and verdict."""
    lines = [f"# {summary['title']}", ""]
    if summary.get("command"):
        lines += ["```", summary["command"], "```", ""]
    seeds = summary["seeds"]
    lines.append(f"Seeds: {', '.join(map(str, seeds)) or 'none complete'}"
                 + (f" (incomplete: {summary['incomplete_seeds']})" if summary.get("incomplete_seeds") else "")
                 + f"; training + evaluation time {summary['wall_s_total'] / 60:.1f} min.")
    lines.append("")
    variants = list(summary["variants"])
    lines.append("| metric | chance | " + " | ".join(variants) + " |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in variants) + " |")
    for m in summary["metrics"].values():
        cells = []
        for v in variants:
            s = m["variants"].get(v)
            if s is None:
                cells.append("-")
                continue
            per_seed = " / ".join(_fmt(x, m["unit"]) for x in s["per_seed"])
            cells.append(f"**{_fmt(s['mean'], m['unit'])}** [{_fmt(s['lo'], m['unit'])}, {_fmt(s['hi'], m['unit'])}]"
                         f"<br>{per_seed}")
        arrow = " (lower is better)" if m["lower_is_better"] else ""
        lines.append(f"| {m['label']}{arrow} | {_fmt(m['chance'], m['unit'])} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean over seeds **bold**, [95% bootstrap interval over seeds and items], then each "
              "seed's value.", ""]
    if summary["claims"]:
        lines += ["## Claims", "", "| claim | metric | difference [95% interval] | claimed effect | MDE | verdict |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for c in summary["claims"]:
            d = c.get("difference")
            diff = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d else "-"
            mde = f"{c['mde']:.2f}" if c.get("mde") is not None else "-"
            lines.append(f"| {c['text']} | {c['metric']} ({c['better']} vs {c['worse']}) | {diff} | "
                         f"{c['effect']:g} | {mde} | **{c['verdict']}** |")
        lines.append("")
    for key, value in (summary.get("derived") or {}).items():
        if isinstance(value, dict) and {"mean", "lo", "hi"} <= set(value):
            lines.append(f"- {key}: {value['mean']:.3f} [{value['lo']:.3f}, {value['hi']:.3f}]"
                         + (f" ({value['note']})" if value.get("note") else ""))
        else:
            lines.append(f"- {key}: {value}")
    prov = summary.get("provenance", {})
    lines += ["", f"vlmalign {prov.get('vlmalign_version')} at {prov.get('git_commit', '')[:10]}; "
              f"{prov.get('hardware', {}).get('cpus')} CPUs; finished {prov.get('finished_utc')}.", ""]
    return "\n".join(lines)


def plot_metrics(summary: dict, max_metrics: int = 16) -> list[tuple[str, dict]]:
    """The metrics `plot` draws: those the claims judge first, then the rest in order,
    at most `max_metrics` (table.md holds every one)."""
    claimed = [c["metric"] for c in summary.get("claims", [])]
    keys = sorted(summary["metrics"], key=lambda k: k not in claimed)  # stable: the table's order within each
    return [(k, summary["metrics"][k]) for k in keys[:max_metrics]]


def plot(summary: dict, path: Path, max_metrics: int = 16) -> Path:
    """One panel per metric (`plot_metrics`): each variant's mean with its 95% interval,
    the per-seed values as dots, the chance level as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    metrics = plot_metrics(summary, max_metrics)
    shown = "" if len(metrics) == len(summary["metrics"]) else f"; {len(metrics)} of {len(summary['metrics'])} metrics"
    cols = min(4, max(1, len(metrics)))
    rows = max(1, -(-len(metrics) // cols))
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), dpi=110)
    variants = list(summary["variants"])
    colours = [f"C{i}" for i in range(len(variants))]
    for n, (_key, m) in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, n + 1)
        for i, v in enumerate(variants):
            s = m["variants"].get(v)
            if s is None:
                continue
            ax.errorbar([i], [s["mean"]], yerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]], fmt="o",
                        color=colours[i], capsize=4, lw=2)
            ax.scatter([i + 0.15] * len(s["per_seed"]), s["per_seed"], s=10, color=colours[i], alpha=0.6)
        if m["chance"] is not None:
            ax.axhline(m["chance"], color="grey", ls=":", lw=1)
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=7)
        ax.set_title(m["label"] + (" (lower better)" if m["lower_is_better"] else ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['title']} ({len(summary['seeds'])} seeds; bars: 95% interval; dots: seeds; "
                 f"dotted: chance{shown})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path
