"""Nearest-neighbour search over an embedding index: exact for small indexes, FAISS for
large ones.

`build_index(vectors)` returns something with `search(queries [Q, D], k) -> (scores
[Q, k], rows [Q, k])`, best first, scores = inner products (cosines for vlmalign's
L2-normalised embeddings):

- `ExactIndex`: every vector scored, in bounded-memory tiles (`eval.ranking.topk_similarity`).
  Perfect recall; the time per query grows with N x D.
- `FaissIndex`: FAISS (`pip install "vlmalign[faiss]"`, the `faiss-cpu` wheel). By default an
  inverted-file index (IVF-Flat, inner product, spherical k-means over ~sqrt(N) lists,
  searched in `nprobe` of them, by default an eighth), so a query scores about
  N * nprobe / nlist vectors.
  `exact=True` gives FAISS's flat (exhaustive) index instead, for checking.

`method="auto"` searches exactly up to `EXACT_MAX_VECTORS` vectors and with IVF above it
(falling back to exact search, with a warning, when FAISS is not installed). The switch
point and the default share of lists probed come from `benchmarks/search_scale.py` (benchmarks/README.md,
"Search at scale"). An IVF index is trained once and can be saved next to the embeddings
(`cached_index`), so later searches load it instead of training again.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from vlmalign.eval.ranking import topk_similarity

log = logging.getLogger(__name__)

__all__ = [
    "EXACT_MAX_VECTORS",
    "PROBE_FRACTION",
    "SEARCH_METHODS",
    "SearchIndex",
    "ExactIndex",
    "FaissIndex",
    "faiss_available",
    "build_index",
    "cached_index",
]

# Up to this many vectors exact search answers a query in tens of milliseconds on 2 CPU
# cores at D=576 (the SmolLM2 embedding size) and needs no training; above it IVF keeps
# recall@10 >= 0.95 at a fraction of the time (benchmarks/README.md, "Search at scale").
EXACT_MAX_VECTORS = 100_000
# Share of the IVF lists searched per query (at least MIN_NPROBE lists): with ~sqrt(N)
# lists, an eighth kept recall@10 >= 0.95 on our clustered synthetic sets of 10^4-10^6
# vectors, where a fixed 32 lists fell to 0.94 at 10^6 (benchmarks/README.md, "Search at
# scale"). More lists, higher recall, slower queries: `nprobe` sets it per index.
PROBE_FRACTION = 1 / 8
MIN_NPROBE = 8
SEARCH_METHODS = ("auto", "exact", "faiss")
FAISS_HINT = 'install FAISS with `pip install "vlmalign[faiss]"` (the faiss-cpu wheel)'


class SearchIndex(Protocol):
    kind: str
    ntotal: int

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]: ...


def _as_matrix(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().cpu().float()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}")
    return t.contiguous()


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} hold {int((~torch.isfinite(x)).any(dim=1).sum())} row(s) with NaN or inf; "
                         "re-embed them (an empty image or text?) before searching")


class ExactIndex:
    """Exhaustive inner-product search in bounded memory."""

    kind = "exact"

    def __init__(self, vectors: Tensor | np.ndarray) -> None:
        self.vectors = _as_matrix(vectors, "vectors")  # [N, D]
        self.ntotal = self.vectors.shape[0]
        _check_finite(self.vectors, "vectors")  # once, not at every query

    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """(scores [Q, k'], rows [Q, k']), best first, k' = min(k, N)."""
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries have size {q.shape[1]}, the index {self.vectors.shape[1]}")
        _check_finite(q, "queries")
        return topk_similarity(q, self.vectors, k, check_nan=False)


def faiss_available() -> bool:
    """Whether the `faiss` module (faiss-cpu or faiss-gpu) can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"FAISS is not installed: {FAISS_HINT}") from e
    return faiss


def default_nlist(n: int) -> int:
    """Inverted lists for n vectors: ~sqrt(n) (FAISS guidelines give 4-16 sqrt(n) for
    billion-scale sets; at 10^4-10^6 sqrt(n) trains in seconds on 2 cores and keeps ~sqrt(n)
    vectors per list), at least 1 and at most n / 39 so that k-means has its 39 points per
    centroid."""
    return max(1, min(int(round(math.sqrt(n))), n // 39))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: `PROBE_FRACTION` of `nlist`, at least `MIN_NPROBE`."""
    return min(nlist, max(MIN_NPROBE, math.ceil(nlist * PROBE_FRACTION)))


class FaissIndex:
    """A FAISS inner-product index: IVF-Flat (approximate) or Flat (exact). `nprobe`
    None: `default_nprobe(nlist)`."""

    def __init__(self, index, nprobe: int | None = None) -> None:
        self.index = index
        self.ntotal = int(index.ntotal)
        self.nprobe = nprobe
        self.kind = "faiss-ivf" if hasattr(index, "nlist") else "faiss-flat"

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        if value is None:
            value = default_nprobe(self.index.nlist) if hasattr(self.index, "nlist") else 1
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self._nprobe = int(value)
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = min(self._nprobe, self.index.nlist)

    @classmethod
    def build(
        cls,
        vectors: Tensor | np.ndarray,
        exact: bool = False,
        nlist: int | None = None,
        nprobe: int | None = None,
        train_points_per_list: int = 64,
        seed: int = 0,
    ) -> FaissIndex:
        """Index `vectors` [N, D] (float32 copy inside FAISS).

        IVF: spherical k-means (10 iterations) on a seeded sample of at most
        `train_points_per_list * nlist` vectors, then every vector added to its list.
        """
        faiss = _faiss()
        t = _as_matrix(vectors, "vectors")
        n, d = t.shape
        if n == 0:
            raise ValueError("cannot index 0 vectors")
        _check_finite(t, "vectors")  # FAISS would index NaN rows silently
        x = t.numpy()  # [N, D] float32, C-contiguous
        if exact:
            index = faiss.IndexFlatIP(d)
        else:
            nlist = nlist or default_nlist(n)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.spherical = True  # centroids on the unit sphere, as the embeddings are
            index.cp.niter = 10
            index.cp.seed = seed
            m = min(n, train_points_per_list * nlist)
            sample = x if m == n else x[np.random.default_rng(seed).choice(n, m, replace=False)]
            index.train(sample)
        index.add(x)
        return cls(index, nprobe)

    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """(scores [Q, k'], rows [Q, k']), best first, k' = min(k, N). An IVF search that
        finds fewer than k' vectors in its probed lists pads with score -inf, row -1."""
        q = _as_matrix(queries, "queries").numpy()
        if q.shape[1] != self.index.d:
            raise ValueError(f"queries have size {q.shape[1]}, the index {self.index.d}")
        k = min(k, self.ntotal)
        scores, rows = self.index.search(q, k)
        scores = torch.from_numpy(scores)
        rows = torch.from_numpy(rows)
        return scores.masked_fill(rows < 0, float("-inf")), rows

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self.index, str(path))
        return path

    @classmethod
    def load(cls, path: str | Path, nprobe: int | None = None) -> FaissIndex:
        return cls(_faiss().read_index(str(path)), nprobe)


def choose_method(n: int, method: str = "auto", exact_max: int = EXACT_MAX_VECTORS) -> str:
    """"exact" or "faiss" for an index of n vectors (see the module docstring)."""
    if method not in SEARCH_METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(SEARCH_METHODS)}")
    if method == "exact":
        return "exact"
    if method == "faiss":
        if not faiss_available():
            raise ImportError(f"search method 'faiss' needs FAISS: {FAISS_HINT}")
        return "faiss"
    if n <= exact_max:
        return "exact"
    if not faiss_available():
        log.warning("searching %d vectors exactly (above %d, FAISS would be faster): %s", n, exact_max, FAISS_HINT)
        return "exact"
    return "faiss"


def build_index(
    vectors: Tensor | np.ndarray,
    method: str = "auto",
    exact_max: int = EXACT_MAX_VECTORS,
    nprobe: int | None = None,
) -> ExactIndex | FaissIndex:
    """An index over `vectors` [N, D]: exact up to `exact_max` vectors, FAISS IVF above
    (method "auto"), or as `method` ("exact" | "faiss") says."""
    n = len(vectors)
    if choose_method(n, method, exact_max) == "exact":
        return ExactIndex(vectors)
    return FaissIndex.build(vectors, nprobe=nprobe)


def cached_index(
    vectors: Tensor | np.ndarray,
    source: str | Path,
    method: str = "auto",
    exact_max: int = EXACT_MAX_VECTORS,
    nprobe: int | None = None,
) -> ExactIndex | FaissIndex:
    """`build_index`, keeping a FAISS index in `<source>.faiss` next to the embeddings
    file `source`: loaded when it is newer than `source` and holds as many vectors, built
    and written otherwise (an unwritable folder only costs the rebuild next time)."""
    n = len(vectors)
    if choose_method(n, method, exact_max) == "exact":
        return ExactIndex(vectors)
    source = Path(source)
    path = source.with_name(source.name + ".faiss")
    if path.is_file() and path.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        try:
            index = FaissIndex.load(path, nprobe)
            if index.ntotal == n and index.index.d == _as_matrix(vectors[:1], "vectors").shape[1]:
                return index
            log.info("rebuilding %s: it holds %d vectors, %s %d", path, index.ntotal, source, n)
        except RuntimeError as e:  # a truncated or foreign file
            log.warning("rebuilding %s: %s", path, e)
    index = FaissIndex.build(vectors, nprobe=nprobe)
    try:
        index.save(path)
    except (OSError, RuntimeError) as e:
        log.warning("could not save the FAISS index to %s (%s); it will be rebuilt next time", path, e)
    return index
