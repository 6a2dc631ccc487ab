"""Pictures of a run: loss curves, Recall@K bars, the image-text similarity matrix of a
batch, and a 2-D PCA of image and text embeddings that shows the modality gap.

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg renderer, no pyplot), so
plotting never opens a window, never changes the caller's matplotlib backend and works in
threads and on headless machines. Each `plot_*` function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from torch import Tensor

__all__ = [
    "plot_loss_curves",
    "plot_loss_comparison",
    "plot_recall_bars",
    "plot_similarity_matrix",
    "plot_embedding_projection",
    "pca_2d",
    "write_run_plots",
    "loss_keys",
    "PLOTS_DIR",
]

PLOTS_DIR = "plots"
DPI = 100
# One colour per run, the same in every plot of a report (matplotlib's tab10).
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
IMAGE_COLOUR, TEXT_COLOUR = "#1f77b4", "#ff7f0e"

# Similarity prefixes of the retrieval metrics (eval/evaluate.py) -> what they measure.
SIMILARITY_NAMES = {
    "emb": "prompted last-token embeddings",
    "patch": "CG-VLM patch-token similarity",
    "kp": "Karpathy split, prompted embeddings",
}
# How many candidates each similarity's retrieval ranks (chance R@K = 100 K / N): the key of
# N in the metrics; eval_pairs for the rest.
CANDIDATES_KEY = {"kp": "kp_images"}
DIRECTION_NAMES = {"i2t": "image → text", "t2i": "text → image"}
_RECALL_RE = re.compile(r"^(?P<sim>[A-Za-z0-9]+)_(?P<dir>i2t|t2i)_R@(?P<k>\d+)$")

# Side panels of the loss-curve figure: history key -> (title, y label, log scale).
SIDE_PANELS = {
    "lr": ("Learning rate (warmup + cosine)", "learning rate", False),
    "grad_norm": ("Gradient norm (before clipping)", "L2 norm", False),
    "logit_scale": ("Contrastive logit scale (1 / temperature)", "scale", False),
    "logit_bias": ("SigLIP logit bias", "bias", False),
    "s_per_step": ("Time per optimizer step", "seconds", False),
}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def loss_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Loss keys of a history (`loss`, `ntp_loss`, `clip_loss`, ...), parts first, the
    total (`loss`) last."""
    keys = list(dict.fromkeys(k for e in history for k in e if k == "loss" or k.endswith("_loss")))
    return [k for k in keys if k != "loss"] + (["loss"] if "loss" in keys else [])


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, skipping entries without it or with a non-finite value."""
    xs, ys = [], []
    for i, e in enumerate(history):
        v = e.get(key)
        if _finite(v):
            xs.append(float(e.get("step", i + 1)))
            ys.append(float(v))
    return xs, ys


def _loss_label(key: str) -> str:
    names = {
        "loss": "total (weighted sum)",
        "ntp_loss": "next-token (NTP)",
        "clip_loss": "CLIP contrastive",
        "siglip_loss": "SigLIP contrastive",
        "patch_loss": "patch-token contrastive (CG-VLM)",
        "contrastive_loss": "contrastive",
    }
    return names.get(key, key)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------ loss curves
def plot_loss_curves(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Training curves of one run from its history (`history.jsonl` entries: `step`, the
    loss parts, `lr`, `grad_norm`, `logit_scale`, `s_per_step`). The top panel holds every
    loss part and the total (each point a mean over one log interval); panels below show
    the learning rate, gradient norm, temperature and step time when the history has them.
    """
    keys = loss_keys(history)
    if len(keys) == 2 and keys[-1] == "loss":
        keys = keys[:1]  # one part: the total is the same curve and would hide it
    side = [k for k in SIDE_PANELS if _series(history, k)[0]]
    ncols = max(len(side), 1)
    fig = Figure(figsize=(max(10.0, 3.4 * ncols), 7.5 if side else 5.0), layout="constrained")
    grid = fig.add_gridspec(2 if side else 1, ncols, height_ratios=[1.6, 1] if side else [1])
    ax = fig.add_subplot(grid[0, :])
    for key in keys:
        xs, ys = _series(history, key)
        total = key == "loss"
        ax.plot(xs, ys, marker="o", markersize=3, label=_loss_label(key),
                color="black" if total else None, linewidth=2.2 if total else 1.5, linestyle="--" if total else "-")
    if keys:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (cross-entropy, nats)")
        ax.legend(title="loss part", loc="upper right")
        ax.grid(alpha=0.3)
    else:
        _no_data(ax, "no loss values in the history")
    ax.set_title("Training loss, mean over each log interval")
    for i, key in enumerate(side):
        sub = fig.add_subplot(grid[1, i])
        xs, ys = _series(history, key)
        name, ylabel, log = SIDE_PANELS[key]
        sub.plot(xs, ys, color="#555", marker="o", markersize=2)
        sub.set_title(name, fontsize=10)
        sub.set_xlabel("optimizer step")
        sub.set_ylabel(ylabel)
        sub.grid(alpha=0.3)
        if key == "lr":
            sub.yaxis.set_major_formatter(FormatStrFormatter("%.0e"))
        if log:
            sub.set_yscale("log")
    fig.suptitle(title or "Training curves", fontsize=14, fontweight="bold")
    return _save(fig, path)


def plot_loss_comparison(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Loss curves of several runs overlaid: one panel per loss key (union over runs),
    one colour per run (the same colour as in `plot_recall_bars`)."""
    keys = list(dict.fromkeys(k for h in histories.values() for k in loss_keys(h)))
    n = max(len(keys), 1)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.0 * ncols, 4.0 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys or [None], strict=False):
        if key is None:
            _no_data(ax, "no run has loss values in its history")
            continue
        for i, (run, history) in enumerate(histories.items()):
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=run, color=RUN_COLOURS[i % len(RUN_COLOURS)])
        ax.set_title(_loss_label(key) + f"  ({key})", fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(title="run", fontsize=9)
    for ax in axes[len(keys or [None]):]:
        ax.set_visible(False)
    fig.suptitle("Training loss by run (lower is better)", fontsize=14, fontweight="bold")
    return _save(fig, path)


# ------------------------------------------------------------------------ recall bars
def _recall_layout(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """{similarity prefix: {direction: sorted Ks}} over every run's recall keys."""
    layout: dict[str, dict[str, set[int]]] = {}
    for metrics in results.values():
        for key in metrics:
            if m := _RECALL_RE.match(key):
                layout.setdefault(m["sim"], {}).setdefault(m["dir"], set()).add(int(m["k"]))
    order = [s for s in SIMILARITY_NAMES if s in layout] + sorted(s for s in layout if s not in SIMILARITY_NAMES)
    return {s: {d: sorted(layout[s][d]) for d in ("i2t", "t2i") if d in layout[s]} for s in order}


def plot_recall_bars(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Recall@K (%) as grouped bars: one panel per (similarity, direction), e.g.
    `emb_i2t_R@1/5/10`, one bar colour per run; dashed marks show chance (100 K / N, N the
    number of images ranked: `eval_pairs`, or `kp_images` for `kp_`) when the metrics hold
    N and every run has the same N."""
    layout = _recall_layout(results)
    rows = list(layout) or [None]
    fig = Figure(figsize=(12.0, 3.8 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    runs = list(results)

    def candidates(sim: str | None) -> float | None:
        key = CANDIDATES_KEY.get(sim or "", "eval_pairs")
        ns = {float(m[key]) for m in results.values() if _finite(m.get(key))}
        return ns.pop() if len(ns) == 1 else None

    n_pairs = candidates("emb")
    for r, sim in enumerate(rows):
        for c, direction in enumerate(("i2t", "t2i")):
            ax = axes[r, c]
            ks = layout.get(sim, {}).get(direction, []) if sim else []
            if not ks:
                _no_data(ax, "no recall metrics" if sim is None else f"no {sim}_{direction} metrics")
                continue
            width = 0.8 / max(len(runs), 1)
            x = np.arange(len(ks))
            for i, run in enumerate(runs):
                vals = [results[run].get(f"{sim}_{direction}_R@{k}") for k in ks]
                heights = [float(v) if _finite(v) else 0.0 for v in vals]
                bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width * 0.95,
                              label=run, color=RUN_COLOURS[i % len(RUN_COLOURS)])
                for bar, v in zip(bars, vals, strict=True):
                    label = f"{float(v):.1f}" if _finite(v) else "n/a"
                    ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
            if n := candidates(sim):
                for j, k in enumerate(ks):
                    chance = min(100.0, 100.0 * k / n)
                    ax.hlines(chance, j - 0.45, j + 0.45, colors="black", linestyles="dashed", linewidth=1.2,
                              label="chance (K / N)" if j == 0 else None)
            ax.set_xticks(x, [f"R@{k}" for k in ks])
            ax.set_ylim(0, 105)
            ax.set_ylabel("recall (%)")
            ax.set_title(f"{DIRECTION_NAMES[direction]}: {SIMILARITY_NAMES.get(sim, sim)}", fontsize=11)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
    sub = f" on {int(n_pairs)} held-out pairs" if n_pairs else ""
    fig.suptitle(f"Retrieval Recall@K{sub} (higher is better)", fontsize=14, fontweight="bold")
    return _save(fig, path)


# ------------------------------------------------------------------ similarity matrix
def _short(text: str, n: int = 28) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_similarity_matrix(sim: Tensor, path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Heat map of an image-text similarity matrix `sim` [N_img, N_txt] (cosines of a
    batch; row i and column i are a matching pair when the matrix is square). A white dot
    marks each image's best caption, so a good model puts the dots on the diagonal.
    `labels`: captions (column order), shown as tick labels when there are at most 24."""
    s = torch.as_tensor(sim).detach().float().cpu().numpy()  # [N_img, N_txt]
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"sim must be a non-empty 2-D [N_img, N_txt] matrix, got shape {tuple(s.shape)}")
    n_img, n_txt = s.shape
    size = min(3.5 + 0.22 * max(n_img, n_txt), 10.0)
    has_labels = labels is not None and n_txt <= 24
    fig = Figure(figsize=(size + 2.0, size + (2.0 if has_labels else 0.0)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(s, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.85)
    best = s.argmax(axis=1)  # [N_img]
    ax.scatter(best, np.arange(n_img), s=18, c="white", edgecolors="black", linewidths=0.5, zorder=3)
    title = "Image-text similarity of a batch\nwhite dot: each image's most similar caption"
    if n_img == n_txt:
        hits = int((best == np.arange(n_img)).sum())
        title += f"\nimage i and caption i are a pair (the diagonal); dots on it: {hits}/{n_img}"
    ax.set_title(title, fontsize=12)
    ax.set_xlabel("caption (text) index")
    ax.set_ylabel("image index")
    if has_labels:
        ax.set_xticks(range(n_txt), [f"{j}: {_short(t)}" for j, t in enumerate(labels[:n_txt])],
                      rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("caption")
    if n_img <= 24:
        ax.set_yticks(range(n_img))
    return _save(fig, path)


# ------------------------------------------------------------------ modality gap (PCA)
def _normalise(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x).detach().to(torch.float64).cpu()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, D] matrix, got shape {tuple(x.shape)}")
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pca_2d(img_emb: Tensor, txt_emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Project L2-normalised image [N, D] and text [M, D] embeddings onto the top two
    principal components of both sets together (one shared basis, so the distance between
    the two clouds is preserved along those axes).

    Returns (image coordinates [N, 2], text coordinates [M, 2], explained variance ratio
    [2]). Signs are fixed (the largest loading of each component is positive) so the same
    embeddings always give the same picture.
    """
    img = _normalise(img_emb, "img_emb")  # [N, D]
    txt = _normalise(txt_emb, "txt_emb")  # [M, D]
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"img_emb has D={img.shape[1]} and txt_emb D={txt.shape[1]}; both must share one space")
    both = torch.cat([img, txt])  # [N + M, D]
    centred = both - both.mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # vh [K, D]
    comps = vh[:2]  # [2, D] (one row when D or N + M is 1)
    idx = comps.abs().argmax(dim=1)
    comps = comps * torch.sign(comps[torch.arange(len(comps)), idx]).unsqueeze(1)
    if comps.shape[0] < 2:
        comps = torch.cat([comps, torch.zeros(2 - comps.shape[0], comps.shape[1], dtype=comps.dtype)])
        s = torch.cat([s, torch.zeros(2 - s.shape[0], dtype=s.dtype)])
    xy = centred @ comps.T  # [N + M, 2]
    var = s**2
    ratio = var[:2] / var.sum().clamp_min(1e-30)
    n = img.shape[0]
    return xy[:n].float(), xy[n:].float(), ratio.float()


def plot_embedding_projection(img_emb: Tensor, txt_emb: Tensor, path: str | Path) -> Path:
    """2-D PCA of image and text embeddings (see `pca_2d`), coloured by modality, with
    each modality's centroid and the gap between them: `gap` = ||mean(x_i) - mean(y_j)||
    of the L2-normalised embeddings (Liang et al. 2022, "Mind the Gap"), measured in the
    full D-dimensional space. When N == M, row i of each is a pair, joined by a faint line."""
    img_xy, txt_xy, ratio = pca_2d(img_emb, txt_emb)
    img_n, txt_n = _normalise(img_emb, "img_emb"), _normalise(txt_emb, "txt_emb")
    gap = float((img_n.mean(0) - txt_n.mean(0)).norm())
    a, b = img_xy.numpy(), txt_xy.numpy()
    fig = Figure(figsize=(11.0, 7.5), layout="constrained")
    ax = fig.add_subplot()
    if len(a) == len(b):
        for (x0, y0), (x1, y1) in zip(a, b, strict=True):
            ax.plot([x0, x1], [y0, y1], color="#999", alpha=0.25, linewidth=0.8, zorder=1)
        ax.plot([], [], color="#999", alpha=0.5, label="matched image-caption pair")
    ax.scatter(a[:, 0], a[:, 1], s=28, c=IMAGE_COLOUR, marker="o", alpha=0.8, label=f"image ({len(a)})", zorder=2)
    ax.scatter(b[:, 0], b[:, 1], s=34, c=TEXT_COLOUR, marker="^", alpha=0.8, label=f"text ({len(b)})", zorder=2)
    ca, cb = a.mean(0), b.mean(0)
    ax.annotate("", xy=cb, xytext=ca, arrowprops={"arrowstyle": "<->", "color": "black", "linewidth": 1.8}, zorder=4)
    mid = (ca + cb) / 2
    ax.annotate("modality gap", xy=mid, xytext=(0, 8), textcoords="offset points", ha="center",
                fontsize=10, fontweight="bold", zorder=6)
    ax.scatter(*ca, s=220, c=IMAGE_COLOUR, marker="*", edgecolors="black", zorder=5, label="image centroid")
    ax.scatter(*cb, s=220, c=TEXT_COLOUR, marker="*", edgecolors="black", zorder=5, label="text centroid")
    ax.set_xlabel(f"principal component 1 ({100 * float(ratio[0]):.0f}% of variance)")
    ax.set_ylabel(f"principal component 2 ({100 * float(ratio[1]):.0f}% of variance)")
    ax.set_title(
        f"Modality gap: image vs text embeddings, PCA of both together\n"
        f"gap = ‖mean(image) − mean(text)‖ = {gap:.3f}  (L2-normalised, full dimension; 0 = no gap, max 2)",
        fontsize=11,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
    return _save(fig, path)


# ------------------------------------------------------------------------- per run
def write_run_plots(
    run_dir: str | Path,
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any] | None,
    img_emb: Tensor | None = None,
    txt_emb: Tensor | None = None,
    captions: Sequence[str] | None = None,
    max_matrix: int = 16,
) -> list[Path]:
    """Write the plots of one run under `run_dir/plots/` and return the files written:

    - `loss_curves.png` (when `history` has entries),
    - `recall_at_k.png` (when `metrics` has `*_R@K` keys),
    - `similarity_matrix.png` (embeddings given: the first `max_matrix` rows of each,
      paired row by row, `captions` as labels),
    - `embedding_pca.png` (embeddings given: all rows).
    """
    out = Path(run_dir) / PLOTS_DIR
    name = Path(run_dir).name
    written: list[Path] = []
    if history:
        written.append(plot_loss_curves(history, out / "loss_curves.png", title=f"Training curves: {name}"))
    if metrics and _recall_layout({name: metrics}):
        written.append(plot_recall_bars({name: metrics}, out / "recall_at_k.png"))
    if img_emb is not None and txt_emb is not None:
        n = min(len(img_emb), len(txt_emb), max_matrix)
        img_n = _normalise(img_emb[:n], "img_emb")
        txt_n = _normalise(txt_emb[:n], "txt_emb")
        sim = img_n @ txt_n.T  # [n, n]
        labels = list(captions[:n]) if captions is not None else None
        written.append(plot_similarity_matrix(sim, out / "similarity_matrix.png", labels))
        written.append(plot_embedding_projection(img_emb, txt_emb, out / "embedding_pca.png"))
    return written
