"""Search over embedding indexes: exact for small ones, FAISS for large ones."""

from __future__ import annotations

import logging

import pytest
import torch

from vlmalign import search_index
from vlmalign.inference import search, write_index
from vlmalign.search_index import ExactIndex, build_index, cached_index, choose_method


def clustered(n: int, dim: int = 32, clusters: int = 50, seed: int = 0, noise: float = 0.35) -> torch.Tensor:
    """Unit vectors around `clusters` centres with uneven (Zipf-like) cluster sizes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    weights = 1.0 / torch.arange(1, clusters + 1).float()
    assign = torch.multinomial(weights, n, replacement=True, generator=g)
    x = centres[assign] + noise * torch.randn(n, dim, generator=g) / dim**0.5 * 3
    return torch.nn.functional.normalize(x, dim=1)


def full_topk(x: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    return (q @ x.T).topk(k, dim=1).indices


def test_exact_index_is_the_full_topk():
    x, q = clustered(3000), clustered(20, seed=1)
    scores, rows = ExactIndex(x).search(q, 10)
    assert torch.equal(rows, full_topk(x, q, 10))
    torch.testing.assert_close(scores, (q @ x.T).topk(10, dim=1).values)


def test_non_finite_vectors_are_refused():
    x = clustered(50)
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="1 row"):
        ExactIndex(x)
    with pytest.raises(ValueError, match="queries"):
        ExactIndex(clustered(50)).search(x[3:4], 5)
    if search_index.faiss_available():
        with pytest.raises(ValueError, match="NaN or inf"):
            search_index.FaissIndex.build(x)


def test_faiss_flat_and_exact_give_the_same_top10():
    pytest.importorskip("faiss", reason='FAISS not installed: pip install "vlmalign[faiss]"')
    x, q = clustered(3000), clustered(30, seed=1)
    exact_scores, exact_rows = ExactIndex(x).search(q, 10)
    flat = search_index.FaissIndex.build(x, exact=True)
    assert flat.kind == "faiss-flat"
    scores, rows = flat.search(q, 10)
    assert torch.equal(rows, exact_rows)
    torch.testing.assert_close(scores, exact_scores, atol=1e-5, rtol=0)


def recall_at_10(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True))
    return hits / exact.numel()


def test_ivf_recall_at_10_is_at_least_090():
    """IVF with the default nprobe (an eighth of ~sqrt(N) lists) on a clustered set in 32
    dimensions: recall@10 against exact search >= 0.90 (benchmarks/README.md reports
    >= 0.95 at 10^4-10^6 vectors of 576 dimensions); probing one list only loses recall,
    which shows the index is approximate at all."""
    pytest.importorskip("faiss", reason='FAISS not installed: pip install "vlmalign[faiss]"')
    x, q = clustered(20_000, clusters=200), clustered(100, clusters=200, seed=0)
    q = torch.nn.functional.normalize(q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(7)), dim=1)
    exact = full_topk(x, q, 10)
    ivf = search_index.FaissIndex.build(x)
    assert ivf.kind == "faiss-ivf" and ivf.index.nlist == search_index.default_nlist(20_000) == 141
    assert ivf.nprobe == ivf.index.nprobe == search_index.default_nprobe(141) == 18
    assert recall_at_10(ivf.search(q, 10)[1], exact) >= 0.90
    ivf.nprobe = 1
    assert recall_at_10(ivf.search(q, 10)[1], exact) < 0.90


def test_default_nprobe():
    assert search_index.default_nprobe(1000) == 125
    assert search_index.default_nprobe(20) == 8  # at least 8 lists
    assert search_index.default_nprobe(5) == 5  # never more than there are


def test_switch_threshold(monkeypatch, caplog):
    assert choose_method(100, "auto", exact_max=100) == "exact"
    assert choose_method(101, "exact", exact_max=100) == "exact"
    with pytest.raises(ValueError, match="auto, exact, faiss"):
        choose_method(10, "annoy")
    monkeypatch.setattr(search_index, "faiss_available", lambda: True)
    assert choose_method(101, "auto", exact_max=100) == "faiss"
    monkeypatch.setattr(search_index, "faiss_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="vlmalign.search_index"):
        assert choose_method(101, "auto", exact_max=100) == "exact"  # falls back, says why
    assert "vlmalign[faiss]" in caplog.text
    with pytest.raises(ImportError, match=r"vlmalign\[faiss\]"):
        choose_method(10, "faiss")


def test_build_index_switches_at_the_threshold():
    pytest.importorskip("faiss", reason='FAISS not installed: pip install "vlmalign[faiss]"')
    x = clustered(400)
    assert build_index(x, exact_max=400).kind == "exact"
    assert build_index(x, exact_max=399).kind == "faiss-ivf"
    assert search_index.EXACT_MAX_VECTORS == 100_000  # the measured switch point the docs state
    assert choose_method(search_index.EXACT_MAX_VECTORS, "auto") == "exact"
    assert choose_method(search_index.EXACT_MAX_VECTORS + 1, "auto") == "faiss"


def test_cached_index_is_saved_and_reused(tmp_path, monkeypatch):
    pytest.importorskip("faiss", reason='FAISS not installed: pip install "vlmalign[faiss]"')
    x = clustered(2000)
    path = write_index(tmp_path / "idx.safetensors", x, [str(i) for i in range(2000)], "image", "ckpt")
    first = cached_index(x, path, exact_max=100)
    assert first.kind == "faiss-ivf" and (tmp_path / "idx.safetensors.faiss").is_file()

    def no_build(*a, **k):
        raise AssertionError("rebuilt although a fresh cached index exists")

    monkeypatch.setattr(search_index.FaissIndex, "build", no_build)
    again = cached_index(x, path, exact_max=100, nprobe=5)
    assert again.ntotal == 2000 and again.index.nprobe == 5
    again.nprobe = first.nprobe
    q = clustered(5, seed=3)
    assert torch.equal(again.search(q, 10)[1], first.search(q, 10)[1])  # the same trained lists
    # a different index of another size is not served from the stale cache
    monkeypatch.undo()
    smaller = cached_index(x[:1000], path, exact_max=100)
    assert smaller.ntotal == 1000


class StubModel:
    """Only what `search` uses: text embeddings."""

    def __init__(self, vectors: torch.Tensor) -> None:
        self.vectors = vectors

    def embed_texts(self, texts, batch_size: int = 32):
        return self.vectors[: len(texts)]


def test_search_returns_names_exact_and_faiss():
    x = clustered(500)
    names = [f"img{i}.jpg" for i in range(500)]
    model = StubModel(x[7:8])
    hits = search(model, x, names, "anything", top=3)
    assert hits[0][0] == "img7.jpg" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [h[0] for h in hits] == [names[i] for i in full_topk(x, x[7:8], 3)[0]]
    with pytest.raises(ValueError, match="rows but"):
        search(model, x, names[:-1], "anything")
    if search_index.faiss_available():
        found = search(model, search_index.FaissIndex.build(x, exact=True), names, "anything", top=3)
        assert [h[0] for h in found] == [h[0] for h in hits]
        assert [h[1] for h in found] == pytest.approx([h[1] for h in hits], abs=1e-5)


def test_cli_search_methods(tiny_cfg, shapes_root, tmp_path, capsys):
    """`vlmalign search --method/--exact-max/--nprobe`: FAISS above the threshold (its index
    kept in INDEX.faiss), exact otherwise, the same best image either way here."""
    pytest.importorskip("faiss", reason='FAISS not installed: pip install "vlmalign[faiss]"')
    import shutil

    from vlmalign.cli import main
    from vlmalign.train.trainer import train

    checkpoint = train(tiny_cfg("align-clip", "train.max_steps=1")).checkpoint
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((shapes_root / "images").glob("*.png"))[:6]:
        shutil.copy(p, folder / p.name)
    index = tmp_path / "index.safetensors"
    assert main(["embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(index)]) == 0
    capsys.readouterr()

    def run(*extra: str) -> tuple[list[str], str]:
        assert main(["search", "--checkpoint", str(checkpoint), "--index", str(index), "--top", "3", *extra,
                     "a red circle"]) == 0
        out = capsys.readouterr()
        return [ln.split()[-1] for ln in out.out.splitlines() if ln.strip()[:2] in ("1.", "2.", "3.")], out.err

    exact, err = run()
    assert "exact search over 6 images" in err and len(exact) == 3
    approx, err = run("--exact-max", "5", "--nprobe", "1")  # 6 > 5: FAISS IVF (one list: exact here)
    assert "faiss-ivf search over 6 images" in err and (tmp_path / "index.safetensors.faiss").is_file()
    assert approx == exact
    forced, err = run("--method", "exact", "--exact-max", "5")
    assert "exact search" in err and forced == exact
