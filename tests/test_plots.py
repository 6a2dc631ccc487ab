"""Plots: files are written and readable, and the PCA behind the modality-gap picture."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmalign.eval.plots import (
    loss_keys,
    pca_2d,
    plot_embedding_projection,
    plot_loss_comparison,
    plot_recall_bars,
    plot_similarity_matrix,
    write_run_plots,
)

HISTORY = [
    {"ntp_loss": 5.0 - s / 10, "clip_loss": 2.0 - s / 40, "loss": 7.0 - s / 8, "step": s, "lr": 1e-3, "grad_norm": 0.5}
    for s in range(5, 45, 5)
]
METRICS = {f"{sim}_{d}_R@{k}": 10.0 * k**0.5 for sim in ("emb", "patch") for d in ("i2t", "t2i") for k in (1, 5, 10)}
METRICS["eval_pairs"] = 80.0


def _check_png(path: Path, min_w: int = 400, min_h: int = 300) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 5_000  # a blank figure is ~2-4 kB
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        # not blank: a real plot has many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1_000_000)) > 20
    assert min_w <= w <= 3000 and min_h <= h <= 3000
    return w, h


def test_loss_keys_put_parts_first_and_total_last():
    assert loss_keys(HISTORY) == ["ntp_loss", "clip_loss", "loss"]


def test_each_plot_writes_a_sane_png(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    _check_png(plot_loss_comparison({"a": HISTORY, "b": HISTORY[:4]}, tmp_path / "cmp.png"))
    w, h = _check_png(plot_recall_bars({"a": METRICS, "b": METRICS}, tmp_path / "r.png"))
    assert h > w * 0.6  # two similarity rows x two directions
    _check_png(plot_similarity_matrix(img @ txt.T, tmp_path / "s.png", labels=[f"cap {i}" for i in range(12)]))
    _check_png(plot_embedding_projection(img, txt, tmp_path / "p.png"))


def test_write_run_plots_writes_what_it_has(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    written = write_run_plots(tmp_path / "run", HISTORY, METRICS, img, txt)
    names = sorted(p.name for p in written)
    assert names == ["embedding_pca.png", "loss_curves.png", "recall_at_k.png", "similarity_matrix.png"]
    assert all(p.parent == tmp_path / "run" / "plots" for p in written)
    for p in written:
        _check_png(p)
    # nothing to draw: nothing written (no empty placeholder files)
    assert write_run_plots(tmp_path / "empty", [], {"heldout_ntp_loss": 2.0}) == []
    assert not (tmp_path / "empty" / "plots").exists()


def test_pca_keeps_two_separated_clusters_apart():
    """Images around +e0 and texts around +e1 (a modality gap): the first component
    separates them, and the result does not depend on the run (fixed signs)."""
    g = torch.Generator().manual_seed(0)
    d = 32
    img = torch.zeros(50, d)
    img[:, 0] = 1.0
    txt = torch.zeros(60, d)
    txt[:, 1] = 1.0
    img = img + 0.05 * torch.randn(50, d, generator=g)
    txt = txt + 0.05 * torch.randn(60, d, generator=g)
    a, b, ratio = pca_2d(img, txt)
    assert a.shape == (50, 2) and b.shape == (60, 2) and ratio.shape == (2,)
    # clusters fall on opposite sides of PC1, with no overlap
    assert (a[:, 0].min() > b[:, 0].max()) or (b[:, 0].min() > a[:, 0].max())
    # centroid distance along PC1 ~ distance between e0 and e1 (sqrt 2), after normalising
    assert abs(float(a[:, 0].mean() - b[:, 0].mean())) == pytest.approx(2**0.5, rel=0.05)
    assert float(ratio[0]) > 0.8 and float(ratio.sum()) <= 1.0 + 1e-6
    a2, b2, _ = pca_2d(img.clone(), txt.clone())
    assert torch.allclose(a, a2) and torch.allclose(b, b2)


def test_pca_is_invariant_to_embedding_scale_and_checks_shapes():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(10, 6, generator=g), torch.randn(8, 6, generator=g)
    a, b, _ = pca_2d(img, txt)
    a2, b2, _ = pca_2d(img * 7.0, txt * 0.1)  # L2-normalised first
    assert torch.allclose(a, a2, atol=1e-5) and torch.allclose(b, b2, atol=1e-5)
    with pytest.raises(ValueError, match="D=6.*D=5"):
        pca_2d(img, torch.randn(8, 5))


def test_similarity_matrix_rejects_a_vector(tmp_path: Path):
    with pytest.raises(ValueError, match="2-D"):
        plot_similarity_matrix(torch.ones(5), tmp_path / "x.png")
