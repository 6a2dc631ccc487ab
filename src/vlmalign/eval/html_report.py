"""`vlmalign report RUN_DIR [RUN_DIR...]`: one self-contained `report.html` that compares
runs side by side: a metrics table (rows = metrics, columns = runs), the config values that
differ, loss curves overlaid, Recall@K bars and each run's own plots.

Everything is inline (CSS, PNGs as base64 data URIs), so the file can be mailed, attached
to an issue or opened offline. What a run folder lacks (no metrics yet, no history) is
said in the page, with the command that produces it; it never stops the report.

A run folder is what `vlmalign train` writes:

```
runs/align/
  config.yaml  history.jsonl  train.log  tb/  plots/*.png
  latest                    -> "checkpoint-90"
  checkpoint-90/metrics.json, config.yaml, trainer_state.json, ...
```

A checkpoint folder, or a folder of run folders (`runs/demo`), is accepted too.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from vlmalign.eval import plots

__all__ = ["RunInfo", "load_run", "expand_run_dirs", "write_report", "default_report_path", "metric_label"]

REPORT_NAME = "report.html"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Per-run plots, in the order shown (others found under plots/ follow, by name).
PLOT_ORDER = {
    "loss_curves.png": "Training curves",
    "recall_at_k.png": "Recall@K",
    "similarity_matrix.png": "Similarity matrix of a batch",
    "embedding_pca.png": "Modality gap (PCA)",
}
# Config keys left out of the "what differs" table: they differ between any two runs.
CONFIG_DIFF_SKIP = {"train.out_dir"}


@dataclass
class RunInfo:
    """What the report knows about one run; `notes` says what is missing and how to get it."""

    name: str
    path: Path  # as given on the command line
    run_dir: Path
    checkpoint: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- loading
def _is_run_dir(path: Path) -> bool:
    return any((path / n).exists() for n in ("latest", "history.jsonl", "config.yaml", "metrics.json", "train.log"))


def _newest_checkpoint(run_dir: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run folders to report on: each path as given, except that a folder which is no
    run itself but holds runs (`runs/demo` holding `align/`, `align-cg/`, ...) stands for
    those runs, in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not _is_run_dir(p) and not _CHECKPOINT_RE.match(p.name):
            children = sorted(c for c in p.iterdir() if c.is_dir() and _is_run_dir(c))
            if children:
                out.extend(children)
                continue
        out.append(p)
    return out


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"could not read {path}: {e}")
        return None


def _read_history(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    entries = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            notes.append(f"{path} line {i} is not JSON ({e.msg}); skipped")
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def load_run(path: str | Path) -> RunInfo:
    """Collect one run's metrics, history, config and plots. `path` is a run folder (the
    checkpoint named in its `latest` file, else its newest `checkpoint-*`, holds
    `metrics.json`) or a checkpoint folder (its parent is the run folder)."""
    path = Path(path)
    run = RunInfo(name=path.name, path=path, run_dir=path)
    if not path.is_dir():
        run.notes.append(f"{path} is not a folder; give a run folder such as runs/align")
        return run
    if _CHECKPOINT_RE.match(path.name):
        run.checkpoint, run.run_dir = path, path.parent
        run.name = f"{path.parent.name}/{path.name}"
    elif (path / "latest").is_file():
        latest = (path / "latest").read_text(encoding="utf-8").strip()
        if (path / latest).is_dir():
            run.checkpoint = path / latest
        else:
            run.notes.append(f"{path / 'latest'} names {latest!r}, which is not a folder under {path}")
            run.checkpoint = _newest_checkpoint(path)
    else:
        run.checkpoint = _newest_checkpoint(path)
    rd, ck = run.run_dir, run.checkpoint

    # metrics.json: {"metrics": {...}, "meta": {...}} (eval/report.py write_metrics)
    metrics_file = next((p for p in ([ck / "metrics.json"] if ck else []) + [rd / "metrics.json"] if p.is_file()), None)
    if metrics_file is not None:
        payload = _read_json(metrics_file, run.notes)
        if isinstance(payload, dict):
            body = payload.get("metrics", payload)
            run.metrics = body if isinstance(body, dict) else {}
            run.meta = payload.get("meta", {}) if isinstance(payload.get("meta"), dict) else {}
    else:
        where = ck or rd
        hint = f"vlmalign eval {ck}" if ck else "vlmalign eval <checkpoint folder>"
        run.notes.append(f"no metrics.json in {where}: evaluate with `{hint}`")

    # history: history.jsonl (written at the end of training), else the checkpoint's state
    if (rd / "history.jsonl").is_file():
        run.history = _read_history(rd / "history.jsonl", run.notes)
    elif ck and (ck / "trainer_state.json").is_file():
        state = _read_json(ck / "trainer_state.json", run.notes)
        run.history = [e for e in (state or {}).get("history", []) if isinstance(e, dict)]
    if not run.history:
        run.notes.append(f"no training history (history.jsonl) in {rd}: loss curves are left out")

    config_file = next((p for p in [rd / "config.yaml"] + ([ck / "config.yaml"] if ck else []) if p.is_file()), None)
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text(encoding="utf-8"))
            run.config = data if isinstance(data, dict) else {}
        except yaml.YAMLError as e:
            run.notes.append(f"could not read {config_file}: {e}")
    else:
        run.notes.append(f"no config.yaml in {rd}")

    plot_dir = rd / plots.PLOTS_DIR
    if plot_dir.is_dir():
        found = sorted(plot_dir.glob("*.png"))
        rank = {name: i for i, name in enumerate(PLOT_ORDER)}
        run.plots = sorted(found, key=lambda p: (rank.get(p.name, len(rank)), p.name))
    if not run.plots:
        run.notes.append(f"no plots under {plot_dir}")
    return run


def _unique_names(runs: list[RunInfo]) -> None:
    """Runs with the same folder name (seed0/align, seed1/align) get their parent's name too."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.run_dir.parent.name}/{r.name}"
    seen: dict[str, int] = {}
    for r in runs:  # still equal (the same folder twice): number them
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} ({seen[r.name]})"


# ----------------------------------------------------------------------------- metrics
_RECALL_RE = re.compile(r"^(?P<sim>[A-Za-z0-9]+)_(?P<dir>i2t|t2i)_R@(?P<k>\d+)$")
_SIM = {"emb": "prompted embeddings", "patch": "patch-token", "kp": "Karpathy split, prompted embeddings"}
_DIR = {"i2t": "image → text", "t2i": "text → image"}
_LABELS = {
    "heldout_ntp_loss": "held-out next-token loss",
    "train_ntp_loss": "final train next-token loss",
    "gap_gap": "modality gap ‖mean(img) − mean(txt)‖",
    "gap_matched_cosine": "cosine of matched pairs",
    "gap_mean_image_cosine": "mean image-image cosine",
    "gap_mean_text_cosine": "mean text-text cosine",
    "eval_pairs": "held-out pairs evaluated",
    "kp_images": "Karpathy-split images evaluated",
    "zs_acc": "zero-shot classification, top-1 accuracy",
    "zs_top5_acc": "zero-shot classification, top-5 accuracy",
    "zs_images": "zero-shot images evaluated",
    "eval_seconds": "evaluation time (s)",
    "train_s": "training wall time (s)",
}
SECTIONS = ["Retrieval (%)", "Compositionality, accuracy (%)", "Zero-shot classification (%)", "Modality gap", "Loss", "Other"]


def metric_label(key: str) -> str:
    """A readable row label: `emb_i2t_R@5` -> "image → text R@5 (prompted embeddings)"."""
    if m := _RECALL_RE.match(key):
        return f"{_DIR[m['dir']]} R@{m['k']} ({_SIM.get(m['sim'], m['sim'])})"
    if key in _LABELS:
        return _LABELS[key]
    if key.startswith(("comp_emb_", "comp_patch_")):
        sim, cat = key[5:].split("_", 1)
        summary = {"mean": "mean over categories", "overall": "all items"}
        cat = summary.get(cat, cat.replace("_", " "))
        return f"{cat} ({_SIM.get(sim, sim)})"
    return key


def _section(key: str) -> str:
    if _RECALL_RE.match(key):
        return SECTIONS[0]
    if key.startswith("comp_"):
        return SECTIONS[1]
    if key in ("zs_acc", "zs_top5_acc"):
        return SECTIONS[2]
    if key.startswith("gap_"):
        return SECTIONS[3]
    if "loss" in key:
        return SECTIONS[4]
    return SECTIONS[5]


def _sort_key(key: str) -> tuple:
    if m := _RECALL_RE.match(key):
        sims = list(_SIM)
        return (sims.index(m["sim"]) if m["sim"] in sims else len(sims), m["sim"], m["dir"], int(m["k"]))
    if key.startswith("comp_"):
        sim, cat = key[5:].split("_", 1)
        return (sim, cat not in ("mean", "overall"), cat)
    return (0, key)


def _better(key: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when neither is."""
    if _RECALL_RE.match(key) or key.startswith("comp_") or key in ("zs_acc", "zs_top5_acc"):
        return 1
    if key.endswith("loss"):
        return -1
    return 0


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _fmt(key: str, v: Any) -> str:
    x = _number(v)
    if x is None:
        return "n/a" if v is None else html.escape(str(v))
    if _RECALL_RE.match(key) or key.startswith("comp_") or key in ("zs_acc", "zs_top5_acc"):
        return f"{x:.1f}"
    if key in ("eval_pairs", "kp_images", "zs_images") or key.endswith("_s") or key.endswith("seconds"):
        return f"{x:.0f}"
    return f"{x:.3f}"


def _metrics_table(runs: list[RunInfo]) -> str:
    keys = list(dict.fromkeys(k for r in runs for k in r.metrics if not isinstance(r.metrics[k], (dict, list))))
    if not keys:
        return '<p class="note">No run has a metrics.json yet, so there is nothing to tabulate.</p>'
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    rows = [f'<table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead><tbody>']
    for section in SECTIONS:
        sk = sorted((k for k in keys if _section(k) == section), key=_sort_key)
        if not sk:
            continue
        rows.append(f'<tr class="section"><td colspan="{len(runs) + 1}">{section}</td></tr>')
        for key in sk:
            vals = [_number(r.metrics.get(key)) for r in runs]
            sign = _better(key)
            present = [v for v in vals if v is not None]
            best = (max(present) if sign > 0 else min(present)) if sign and len(present) > 1 else None
            cells = []
            for r, v in zip(runs, vals, strict=True):
                text = _fmt(key, r.metrics.get(key)) if key in r.metrics else "–"
                cls = ' class="best"' if best is not None and v == best and present.count(best) < len(present) else ""
                cells.append(f"<td{cls}>{text}</td>")
            rows.append(f'<tr><th title="{html.escape(key)}">{html.escape(metric_label(key))}'
                        f' <code>{html.escape(key)}</code></th>{"".join(cells)}</tr>')
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_value(v: Any) -> str:
    """A config value for the page: strings bare unless empty, others as JSON."""
    return v if isinstance(v, str) and v.strip() == v and v else json.dumps(v)


def _config_diff(runs: list[RunInfo]) -> str:
    with_cfg = [r for r in runs if r.config]
    if len(with_cfg) < 2:
        return ""
    flats = [_flatten(r.config) for r in with_cfg]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    missing = object()
    diff = [k for k in keys if k not in CONFIG_DIFF_SKIP and len({json.dumps(f.get(k, missing), default=str) for f in flats}) > 1]
    if not diff:
        return "<p>All runs share one config (apart from <code>train.out_dir</code>).</p>"
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in with_cfg)
    rows = [f'<table class="metrics"><thead><tr><th>config key</th>{head}</tr></thead><tbody>']
    for k in diff:
        cells = "".join(f"<td>{html.escape(_config_value(f[k]) if k in f else '–')}</td>" for f in flats)
        rows.append(f"<tr><th><code>{html.escape(k)}</code></th>{cells}</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- images
def _img_tag(png: bytes | Path, alt: str) -> str:
    data = png.read_bytes() if isinstance(png, Path) else png
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _comparison_plots(runs: list[RunInfo]) -> list[tuple[str, str, str]]:
    """(title, explanation, <img>) of the plots drawn across runs, made in a temp folder."""
    out = []
    with tempfile.TemporaryDirectory(prefix="vlmalign-report-") as tmp:
        histories = {r.name: r.history for r in runs if r.history}
        if histories:
            p = plots.plot_loss_comparison(histories, Path(tmp) / "loss.png")
            out.append(("Training loss", "Each point is the mean loss over one logging interval. "
                        "Loss parts are in nats (cross-entropy); the total is their weighted sum.",
                        _img_tag(p, "training loss by run")))
        results = {r.name: r.metrics for r in runs if r.metrics}
        if results and any(_RECALL_RE.match(k) for m in results.values() for k in m):
            p = plots.plot_recall_bars(results, Path(tmp) / "recall.png")
            out.append(("Retrieval Recall@K", "R@K: the share of queries whose match is among the K most "
                        "similar candidates. Dashed marks: chance (K / number of pairs).",
                        _img_tag(p, "Recall@K by run")))
    return out


# ----------------------------------------------------------------------------- page
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 24px auto; max-width: 1500px; padding: 0 16px; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0; } h2 { border-bottom: 2px solid #e5e5e5; padding-bottom: 4px; margin-top: 36px; }
.sub { color: #666; margin-top: 4px; }
.explain { color: #444; max-width: 900px; }
table.metrics { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 4px 10px; }
table.metrics thead th { background: #f3f4f6; position: sticky; top: 0; }
table.metrics tbody th { text-align: left; font-weight: normal; background: #fafafa; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics tr.section td { background: #eef2ff; font-weight: 600; text-align: left; }
td.best { font-weight: 700; background: #e7f7ea; }
code { font-size: 12px; color: #555; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; margin: 6px 0; }
.runs td, .runs th { text-align: left !important; }
figure { margin: 0 0 20px; } figcaption { color: #444; font-size: 14px; margin-bottom: 6px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.grid { display: grid; gap: 16px; align-items: start; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); }
.grid .cell h4 { margin: 4px 0; }
.missing { color: #888; font-style: italic; padding: 20px; border: 1px dashed #ccc; }
details { margin: 6px 0; } pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 12px; }
.legend { font-size: 13px; color: #555; }
"""


def _runs_table(runs: list[RunInfo]) -> str:
    rows = ['<table class="metrics runs"><thead><tr><th>run</th><th>recipe</th><th>steps</th>'
            "<th>folder</th><th>checkpoint</th></tr></thead><tbody>"]
    for r in runs:
        recipe = r.config.get("recipe") or r.meta.get("recipe") or "?"
        steps: Any = r.history[-1].get("step", "?") if r.history else "?"
        if steps == "?" and r.checkpoint and (m := _CHECKPOINT_RE.match(r.checkpoint.name)):
            steps = m.group(1)  # no history: the checkpoint's step
        ck = r.checkpoint.name if r.checkpoint else "–"
        rows.append(f"<tr><th><b>{html.escape(r.name)}</b></th><td>{html.escape(str(recipe))}</td>"
                    f"<td>{html.escape(str(steps))}</td><td><code>{html.escape(str(r.run_dir))}</code></td>"
                    f"<td><code>{html.escape(ck)}</code></td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _per_run_plots(runs: list[RunInfo], skip: set[str]) -> str:
    """Each plot type as a row of images, one per run that has plots (two per screen row
    at most, so a plot stays readable); plot files named in `skip` are left out."""
    shown = [r for r in runs if r.plots]
    if not shown:
        return '<p class="note">No run has a plots/ folder; they are written after training and evaluation.</p>'
    names = list(dict.fromkeys([n for n in PLOT_ORDER] + [p.name for r in shown for p in r.plots]))
    parts = []
    for name in names:
        if name in skip or not any(p.name == name for r in shown for p in r.plots):
            continue
        title = PLOT_ORDER.get(name, name.removesuffix(".png").replace("_", " "))
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append('<div class="grid">')
        for r in shown:
            hit = next((p for p in r.plots if p.name == name), None)
            body = _img_tag(hit, f"{r.name}: {title}") if hit else f'<div class="missing">no {html.escape(name)} in this run</div>'
            parts.append(f'<div class="cell"><h4>{html.escape(r.name)}</h4>{body}</div>')
        parts.append("</div>")
    return "\n".join(parts)


def _chance_note(runs: list[RunInfo]) -> str:
    pairs = sorted({int(v) for r in runs if (v := _number(r.metrics.get("eval_pairs"))) is not None})
    if not pairs:
        return ""
    n = pairs[0]
    text = (f"Chance level with {n} held-out pairs: R@1 = {100 / n:.1f}%, R@5 = {min(100, 500 / n):.1f}%, "
            f"R@10 = {min(100, 1000 / n):.1f}%; compositional accuracy 50%.")
    if len(pairs) > 1:
        text = f"Runs were evaluated on different numbers of pairs ({', '.join(map(str, pairs))}): their recalls are not directly comparable. " + text
    return f'<p class="legend">{text}</p>'


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write one self-contained HTML page comparing `run_dirs` side by side and return its
    path. Each entry is a run folder, a checkpoint folder or a folder of runs (see
    `expand_run_dirs`); what a run lacks is noted in the page. `out` is the HTML file
    (a folder gets `report.html` inside it); its parent folders are created."""
    out = Path(out)
    if out.is_dir() or out.suffix.lower() not in (".html", ".htm"):
        out = out / REPORT_NAME
    runs = [load_run(p) for p in expand_run_dirs(list(run_dirs))]
    if not runs:
        raise ValueError("no run folders given; pass one or more, e.g. runs/align runs/align-cg")
    _unique_names(runs)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vlmalign report: {html.escape(', '.join(r.name for r in runs))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>vlmalign run report</h1>",
        f'<p class="sub">{len(runs)} run(s): {html.escape(", ".join(r.name for r in runs))} · generated {stamp}</p>',
        "<h2>Runs</h2>",
        _runs_table(runs),
    ]
    notes = [(r.name, n) for r in runs for n in r.notes]
    if notes:
        parts.append("<h3>Missing pieces</h3>")
        parts += [f'<div class="note"><b>{html.escape(name)}</b>: {html.escape(n)}</div>' for name, n in notes]
    parts += [
        "<h2>Metrics</h2>",
        '<p class="explain">Rows are metrics, columns are runs; hover a row for its key in '
        "<code>metrics.json</code>. The best value of a row is highlighted where higher (recall, accuracy) "
        "or lower (loss) is clearly better. <i>Prompted embeddings</i>: last-token states of the LLM "
        "under a one-word-summary prompt (Ak et al., VladVA). <i>Patch-token</i>: CG-VLM's mean cosine "
        "between pooled visual tokens and caption token embeddings.</p>",
        _chance_note(runs),
        _metrics_table(runs),
    ]
    diff = _config_diff(runs)
    if diff:
        parts += ["<h2>Config differences</h2>", '<p class="explain">Only the keys whose values differ '
                  "between runs; each run's full resolved config is at the end of the page.</p>", diff]
    comparison = _comparison_plots(runs)
    if comparison:
        parts.append("<h2>Comparison plots</h2>")
        for title, text, img in comparison:
            parts.append(f"<figure><h3>{html.escape(title)}</h3><figcaption>{html.escape(text)}</figcaption>{img}</figure>")
    parts += [
        "<h2>Per-run plots</h2>",
        '<p class="explain">The similarity matrix shows cosine similarities between the images and captions '
        "of one held-out batch: a model that aligns the two puts the brightest cell of each row on the "
        "diagonal. The PCA plot projects image and text embeddings into one 2-D plane: the distance "
        "between the two clouds is the <i>modality gap</i> (Liang et al. 2022).</p>",
        _per_run_plots(runs, skip={"recall_at_k.png"} if any("Recall" in t for t, _, _ in comparison) else set()),
        "<h2>Full configs</h2>",
    ]
    for r in runs:
        body = html.escape(yaml.safe_dump(r.config, sort_keys=False)) if r.config else "(no config.yaml)"
        parts.append(f"<details><summary>{html.escape(r.name)}</summary><pre>{body}</pre></details>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, out)
    return out


def default_report_path(run_dirs: list[str | Path]) -> Path:
    """Where `vlmalign report` writes without `--out`: `report.html` in the folder the
    run folders share (`runs/demo/report.html` for runs/demo/align runs/demo/align-cg),
    or in the one run folder given."""
    paths = [Path(p).resolve() for p in run_dirs]
    if len(paths) == 1:
        return paths[0] / REPORT_NAME
    return Path(os.path.commonpath(paths)) / REPORT_NAME
