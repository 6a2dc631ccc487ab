"""Bounded-memory ranking (vlmalign.eval.ranking) against the full-matrix computation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlmalign.eval.metrics import retrieval_metrics
from vlmalign.eval.ranking import block_shape, retrieval_ranks, similarity_blocks, topk_similarity


def full_matrix_recalls(sim: torch.Tensor, t2i: torch.Tensor, ks) -> dict[str, float]:
    """The reference: every rank from the whole [N_img, N_txt] matrix at once (ties count
    against the correct item)."""
    n_img, n_txt = sim.shape
    is_match = torch.zeros(n_img, n_txt, dtype=torch.bool)
    is_match[t2i, torch.arange(n_txt)] = True
    best = sim.masked_fill(~is_match, float("-inf")).amax(dim=1)
    i2t = ((sim >= best[:, None]) & ~is_match).sum(dim=1)
    correct = sim[t2i, torch.arange(n_txt)]
    t2i_rank = (sim >= correct[None, :]).sum(dim=0) - 1
    out = {f"i2t_R@{k}": 100.0 * float((i2t < k).double().mean()) for k in ks}
    out |= {f"t2i_R@{k}": 100.0 * float((t2i_rank < k).double().mean()) for k in ks}
    return out


def random_features(seed: int, n_img: int = 60, per_image: int = 5, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, dim, generator=g)
    t2i = torch.randperm(n_img * per_image, generator=g) % n_img  # shuffled, 5 captions each
    txt = img[t2i] + 1.5 * torch.randn(len(t2i), dim, generator=g)  # signal, far from perfect
    return img, txt, t2i


def clustered_features(seed: int, n_img: int = 48, per_image: int = 3, dim: int = 8):
    """Small-integer features around 4 cluster centres, with duplicated images and captions:
    many scores are exactly equal, and every product is exact in float32 whatever the
    summation order, so the tiles score exactly what the full matrix does."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randint(-3, 4, (4, dim), generator=g).float()
    img = centres[torch.arange(n_img) % 4] + torch.randint(-1, 2, (n_img, dim), generator=g).float()
    img[1::6] = img[0::6][: len(img[1::6])]  # duplicated images: exact ties on the t2i side
    t2i = torch.arange(n_img).repeat_interleave(per_image)
    txt = img[t2i] + torch.randint(-2, 3, (len(t2i), dim), generator=g).float()
    txt[2::7] = txt[0::7][: len(txt[2::7])]  # duplicated captions: exact ties on the i2t side
    return img, txt, t2i


KS = (1, 2, 5, 10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [7, 64, 10_000, 1 << 24])
def test_random_features_match_full_matrix(seed, block):
    img, txt, t2i = random_features(seed)
    want = full_matrix_recalls(img @ txt.T, t2i, KS)
    assert retrieval_metrics((img, txt), t2i, KS, max_block_elements=block) == want
    assert retrieval_metrics(img @ txt.T, t2i, KS, max_block_elements=block) == want
    assert 0 < want["i2t_R@1"] < 100 and 0 < want["t2i_R@5"] < 100  # not a trivial case


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block", [1, 5, 50, 1 << 24])
def test_clustered_features_with_ties_match_full_matrix(seed, block):
    img, txt, t2i = clustered_features(seed)
    sim = img @ txt.T
    # the construction does make exact ties between a correct and a wrong item
    correct = sim[t2i, torch.arange(len(t2i))]
    assert int((sim == correct[None, :]).sum()) > len(t2i)
    want = full_matrix_recalls(sim, t2i, KS)
    assert retrieval_metrics((img, txt), t2i, KS, max_block_elements=block) == want
    assert retrieval_metrics(sim, t2i, KS, max_block_elements=block) == want


def test_infinite_scores_follow_the_tie_rule():
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(6, 12, generator=g).round()
    sim[0, :] = float("-inf")  # image 0: every score -inf, its own captions too
    sim[:, 5] = float("-inf")
    sim[2, 7] = float("inf")
    t2i = torch.arange(12) % 6
    for block in (1, 4, 100):
        assert retrieval_metrics(sim, t2i, (1, 3, 20), max_block_elements=block) == full_matrix_recalls(
            sim, t2i, (1, 3, 20)
        )


def test_ranks_are_exact_below_the_cap():
    img, txt, t2i = random_features(4, n_img=40, per_image=2)
    sim = img @ txt.T
    is_match = torch.zeros_like(sim, dtype=torch.bool)
    is_match[t2i, torch.arange(len(t2i))] = True
    best = sim.masked_fill(~is_match, float("-inf")).amax(1)
    want_i2t = ((sim >= best[:, None]) & ~is_match).sum(1).clamp(max=12)
    want_t2i = ((sim >= sim[t2i, torch.arange(len(t2i))][None]).sum(0) - 1).clamp(max=12)
    i2t, t2i_rank = retrieval_ranks((img, txt), t2i, max_rank=12, max_block_elements=33)
    assert torch.equal(i2t, want_i2t) and torch.equal(t2i_rank, want_t2i)


def test_matrix_input_is_not_modified():
    img, txt, t2i = random_features(5)
    sim = img @ txt.T
    before = sim.clone()
    retrieval_metrics(sim, t2i, max_block_elements=100)
    assert torch.equal(sim, before)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        self.ops += 1
        return out


def test_memory_stays_bounded_with_embeddings():
    """From embeddings, no op ever returns a tensor of N_img x N_txt scores (nor half of
    one): the largest is a tile or the inputs, whatever the sizes."""
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, dim = 300, 1500, 8
    img, txt = torch.randn(n_img, dim, generator=g), torch.randn(n_txt, dim, generator=g)
    t2i = torch.arange(n_txt) % n_img
    block = 4096
    rows, cols = block_shape(n_img, n_txt, block)
    assert (rows, cols) == (2, 1500)  # full-width strips of 2 rows: 150 tiles
    assert sum(1 for _ in similarity_blocks((img, txt), block)) == 150
    with LargestTensor() as seen:
        got = retrieval_metrics((img, txt), t2i, KS, max_block_elements=block)
    # candidates of one merge: (k + k') per caption, the largest thing besides a tile
    bound = max(block, n_txt * 2 * max(KS), img.numel(), txt.numel())
    assert seen.ops > 150 and seen.largest <= bound < n_img * n_txt // 2
    assert got == full_matrix_recalls(img @ txt.T, t2i, KS)  # and the answer is still exact


def test_tiles_cover_the_matrix_once():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(23, 4, generator=g), torch.randn(41, 4, generator=g)
    for block in (1, 10, 41, 100, 5000):
        seen = torch.zeros(23, 41, dtype=torch.int64)
        for r0, c0, tile in similarity_blocks((a, b), block):
            assert tile.numel() <= block
            seen[r0 : r0 + tile.shape[0], c0 : c0 + tile.shape[1]] += 1
            torch.testing.assert_close(tile, a[r0 : r0 + tile.shape[0]] @ b[c0 : c0 + tile.shape[1]].T)
        assert bool((seen == 1).all())


@pytest.mark.parametrize("block", [1, 9, 200, 1 << 20])
def test_topk_similarity_matches_full_topk(block):
    g = torch.Generator().manual_seed(2)
    q, keys = torch.randn(7, 16, generator=g), torch.randn(90, 16, generator=g)
    full = (q @ keys.T).topk(10, dim=1)
    values, indices = topk_similarity(q, keys, 10, max_block_elements=block)
    torch.testing.assert_close(values, full.values)
    assert torch.equal(indices, full.indices)  # continuous scores: no ties
    v, i = topk_similarity(q, keys[:4], 10)  # fewer keys than k
    assert v.shape == (7, 4) and sorted(i[0].tolist()) == [0, 1, 2, 3]
