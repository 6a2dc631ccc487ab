"""Ranking in bounded memory: similarity scored tile by tile with a running top-k.

A COCO-5k retrieval evaluation scores 5,000 images against 25,000 captions: 125 M scores,
500 MB in float32, and the masks and comparisons of a naive rank computation several times
that. Here the score matrix is never built (or, when the caller already holds it, never
copied whole): it is visited in tiles of at most `max_block_elements` scores, and each
query keeps only its `k` best scores so far (`RunningTopK`). Memory is O(tile + (N + M) k)
whatever N and M are.

A similarity is given either as a matrix `[N, M]` (tiles are views of it) or as a pair of
embedding matrices `(a [N, D], b [M, D])` meaning `a @ b.T` (tiles are computed, in float32,
on the embeddings' device).

Ranks follow the tie rule of `vlmalign.eval.metrics`: a wrong item that scores exactly the
same as the correct one counts as ranked above it. With the k best *wrong* scores of a query
and the score of its correct item, rank = #(wrong scores >= correct score), which the top k
give exactly as long as it is below k; ranks are therefore reported capped at k.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "Similarity",
    "RunningTopK",
    "block_shape",
    "similarity_blocks",
    "topk_similarity",
    "retrieval_ranks",
]

# 2^24 scores = 64 MB per float32 tile; the tile's top-k and masks add about as much again.
# Large enough that a tile's matmul runs at full speed (our measurement, benchmarks/README.md),
# small enough for any machine that can hold the embeddings.
DEFAULT_BLOCK_ELEMENTS = 1 << 24

# A similarity matrix [N, M], or embeddings (a [N, D], b [M, D]) standing for a @ b.T.
Similarity = Tensor | tuple[Tensor, Tensor]


def _shape(sim: Similarity) -> tuple[int, int]:
    if isinstance(sim, tuple):
        a, b = sim
        return a.shape[0], b.shape[0]
    return sim.shape[0], sim.shape[1]


def _check_similarity(sim: Similarity, check_nan: bool = True) -> Similarity:
    """Float32 views/copies of a similarity, checked: 2-D, matching dims, no NaN (a full
    pass over the data, skipped with `check_nan=False`)."""
    if isinstance(sim, tuple):
        if len(sim) != 2:
            raise ValueError(f"a factored similarity is a pair (a [N, D], b [M, D]), got {len(sim)} items")
        a, b = (torch.as_tensor(x).detach() for x in sim)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"embeddings must be [N, D] and [M, D], got {tuple(a.shape)} and {tuple(b.shape)}")
        for name, x in (("a", a), ("b", b)) if check_nan else ():
            if torch.isnan(x).any():
                raise ValueError(f"embeddings {name} contain NaN; NaN cannot be ranked")
        return a.float(), b.to(a.device).float()
    sim = torch.as_tensor(sim).detach()
    if sim.ndim != 2:
        raise ValueError(f"a similarity matrix must be 2-D, got shape {tuple(sim.shape)}")
    return sim if sim.is_floating_point() else sim.float()


def block_shape(n_rows: int, n_cols: int, max_elements: int = DEFAULT_BLOCK_ELEMENTS) -> tuple[int, int]:
    """(rows, cols) of the tiles that cover an [n_rows, n_cols] matrix with at most
    `max_elements` scores each: full-width strips when a row fits, else single rows cut
    into column blocks."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    cols = max(1, min(n_cols, max_elements))
    rows = max(1, min(n_rows, max_elements // cols))
    return rows, cols


def similarity_blocks(
    sim: Similarity, max_elements: int = DEFAULT_BLOCK_ELEMENTS
) -> Iterator[tuple[int, int, Tensor]]:
    """Tiles `(row0, col0, tile [r, c])` covering the similarity, row strip by row strip.

    A matrix's tiles are views of it (do not modify them); a factored similarity's tiles are
    `a[row0:row0+r] @ b[col0:col0+c].T`, computed here, in float32.
    """
    n_rows, n_cols = _shape(sim)
    rows, cols = block_shape(n_rows, n_cols, max_elements)
    for r0 in range(0, n_rows, rows):
        for c0 in range(0, n_cols, cols):
            if isinstance(sim, tuple):
                a, b = sim
                tile = a[r0 : r0 + rows] @ b[c0 : c0 + cols].T  # [r, c]
            else:
                tile = sim[r0 : r0 + rows, c0 : c0 + cols]  # [r, c] view
            yield r0, c0, tile


class RunningTopK:
    """The k largest scores (and their column indices) seen so far for each of N queries.

    `update(row0, values, indices)` merges candidates `[n, k']` for rows row0..row0+n-1;
    empty slots hold -inf with index -1. Which of several equal scores is kept is
    unspecified; the kept *values* are always the k largest.
    """

    def __init__(self, n: int, k: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.values = torch.full((n, k), float("-inf"), device=device, dtype=dtype)  # [N, k]
        self.indices = torch.full((n, k), -1, device=device, dtype=torch.long)  # [N, k]

    def update(self, row0: int, values: Tensor, indices: Tensor) -> None:
        n = values.shape[0]
        vals = torch.cat([self.values[row0 : row0 + n], values.to(self.values.dtype)], dim=1)  # [n, k + k']
        idx = torch.cat([self.indices[row0 : row0 + n], indices], dim=1)
        best = vals.topk(self.k, dim=1)
        self.values[row0 : row0 + n] = best.values
        self.indices[row0 : row0 + n] = idx.gather(1, best.indices)


@torch.no_grad()
def topk_similarity(
    queries: Tensor,
    keys: Tensor,
    k: int,
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    check_nan: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product: for each query row the k keys of highest `q . key`.

    Scores are computed in float32 tiles of at most `max_block_elements` (never the whole
    [Q, N] matrix when it is larger). Returns `(scores [Q, k'], indices [Q, k'])`,
    k' = min(k, N), best first. `check_nan=False` skips the NaN check of both inputs, for
    keys checked once and searched many times (it costs more than a one-query search).
    """
    q, keys = _check_similarity((queries, keys), check_nan)
    k = min(k, keys.shape[0])
    running = RunningTopK(q.shape[0], max(k, 1), device=q.device)
    if k == 0:
        return running.values[:, :0], running.indices[:, :0]
    for r0, c0, tile in similarity_blocks((q, keys), max_block_elements):
        best = tile.topk(min(k, tile.shape[1]), dim=1)
        running.update(r0, best.values, best.indices + c0)
    return running.values, running.indices


@torch.no_grad()
def retrieval_ranks(
    sim: Similarity,
    text_to_image: Tensor,
    max_rank: int,
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Image->text and text->image ranks of the correct items, capped at `max_rank`.

    - image i: rank = #(captions of *other* images scoring >= i's best own caption);
    - caption j: rank = #(other images scoring >= j's image).

    One pass over the tiles: each tile yields the scores of the correct pairs it holds (the
    own-caption maximum of its images, the correct score of its captions) and, with those
    pairs masked, its k = `max_rank` best wrong scores per image row and per caption column,
    merged into running top-k's. A rank is then the number of kept wrong scores >= the
    correct one (exact when below k, else k).

    Args:
        sim: `[N_img, N_txt]` scores or `(image_emb [N_img, D], text_emb [N_txt, D])`.
        text_to_image: `[N_txt]` long, the image index of each caption.
        max_rank: the largest cut-off K that will be asked (ranks >= it read as max_rank).

    Returns:
        `(i2t_rank [N_img], t2i_rank [N_txt])`, long, on the CPU. An image without any
        caption has no best own score (-inf): every other caption counts above it.
    """
    sim = _check_similarity(sim)
    n_img, n_txt = _shape(sim)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    device = sim[0].device if isinstance(sim, tuple) else sim.device
    t2i = torch.as_tensor(text_to_image).to(device=device, dtype=torch.long)  # [N_txt]
    k = max_rank
    neg_inf = float("-inf")
    dtype = torch.float32 if isinstance(sim, tuple) else sim.dtype
    best_own = torch.full((n_img,), neg_inf, device=device, dtype=dtype)  # [N_img]
    correct = torch.full((n_txt,), neg_inf, device=device, dtype=dtype)  # [N_txt]
    img_wrong = RunningTopK(n_img, k, device=device, dtype=dtype)  # best wrong captions per image
    txt_wrong = RunningTopK(n_txt, k, device=device, dtype=dtype)  # best wrong images per caption

    for r0, c0, tile in similarity_blocks(sim, max_block_elements):
        r, c = tile.shape
        if torch.isnan(tile).any():
            raise ValueError(f"similarity has NaN in rows {r0}..{r0 + r - 1}; NaN cannot be ranked")
        # correct pairs inside this tile: caption j (column) whose image lies in these rows
        img_of_col = t2i[c0 : c0 + c] - r0  # [c]
        cols = torch.nonzero((img_of_col >= 0) & (img_of_col < r)).flatten()  # [n_own]
        rows = img_of_col[cols]  # [n_own]
        own = tile[rows, cols]  # [n_own]
        correct[c0 + cols] = own
        best_own[r0 : r0 + r] = best_own[r0 : r0 + r].scatter_reduce(0, rows, own, "amax")
        # wrong pairs only: the correct ones drop to -inf (never counted, see below)
        wrong = tile if isinstance(sim, tuple) else tile.clone()  # never write into the caller's matrix
        wrong[rows, cols] = neg_inf  # [r, c]
        by_row = wrong.topk(min(k, c), dim=1)  # [r, k']
        img_wrong.update(r0, by_row.values, by_row.indices + c0)
        by_col = wrong.topk(min(k, r), dim=0)  # [k', c]
        txt_wrong.update(c0, by_col.values.T, by_col.indices.T + r0)

    # A -inf threshold is met by every wrong item, including the masked / empty slots that
    # the top-k cannot tell apart from a real -inf: count those exactly instead.
    own_count = torch.bincount(t2i, minlength=n_img)  # [N_img]
    i2t = (img_wrong.values >= best_own[:, None]).sum(dim=1)
    i2t = torch.where(best_own == neg_inf, (n_txt - own_count).clamp(max=k), i2t)
    t2i_rank = (txt_wrong.values >= correct[:, None]).sum(dim=1)
    t2i_rank = torch.where(correct == neg_inf, torch.full_like(t2i_rank, min(n_img - 1, k)), t2i_rank)
    return i2t.cpu(), t2i_rank.cpu()
