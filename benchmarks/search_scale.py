"""Search at 10^4, 10^5 and 10^6 vectors: exact search against FAISS IVF, recall@10 and
query time.

    .venv/bin/python benchmarks/search_scale.py --json benchmarks/results/search-scale-cpu-2core.json

Data: synthetic, clustered like embedding sets (not uniform on the sphere, where every
index is hopeless and no real set lives): unit vectors of SmolLM2's embedding size (576)
drawn around 2 sqrt(N) centres with Zipf-like cluster sizes, the within-cluster spread
set so that a vector's cosine to its centre is ~0.6; queries are new draws from the same
mixture (a caption near the images of its topic). For each size:

- exact search (`search_index.ExactIndex`, bounded-memory tiles): one query at a time
  (median of `--single` queries: what `vlmalign search` does) and a batch of `--queries`;
- FAISS IVF-Flat (`search_index.FaissIndex`, ~sqrt(N) lists, spherical k-means): build
  time (train + add), then for each nprobe the recall@10 against exact search (the share
  of the exact top 10 found) and the same two query times.

Writes a JSON with `os.getloadavg()` before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
from record import write_record  # benchmarks/record.py, beside this script

from vlmalign.search_index import ExactIndex, FaissIndex, default_nlist, default_nprobe


def clustered(n: int, dim: int, seed: int, centres: torch.Tensor | None = None, chunk: int = 100_000):
    """Unit vectors [n, dim] around `centres` (made here when None: 2 sqrt(n), Zipf sizes);
    generated in chunks so that only the result is ever whole."""
    g = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = torch.nn.functional.normalize(torch.randn(max(2, int(2 * n**0.5)), dim, generator=g), dim=1)
    weights = 1.0 / torch.arange(1, len(centres) + 1).float() ** 0.8
    out = torch.empty(n, dim)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        assign = torch.multinomial(weights, m, replacement=True, generator=g)
        # noise of norm ~1.33: cosine to the centre ~0.6
        noise = torch.randn(m, dim, generator=g) * (1.33 / dim**0.5)
        out[i : i + m] = torch.nn.functional.normalize(centres[assign] + noise, dim=1)
    return out, centres


def recall_at_10(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True))
    return hits / exact.numel()


def query_times(index, queries: torch.Tensor, single: int, k: int = 10) -> tuple[float, float, torch.Tensor]:
    """(median ms for one query, ms per query in one batch, rows of the batch [Q, k])."""
    times = []
    for q in queries[:single]:
        t = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    _, rows = index.search(queries, k)
    batch = (time.perf_counter() - t) / len(queries)
    return 1000 * statistics.median(times), 1000 * batch, rows


def run_size(n: int, dim: int, n_queries: int, single: int, nprobes: list[str]) -> dict:
    t = time.perf_counter()
    x, centres = clustered(n, dim, seed=n)
    q, _ = clustered(n_queries, dim, seed=n + 1, centres=centres)
    out: dict = {"vectors": n, "dim": dim, "clusters": len(centres), "queries": n_queries,
                 "data_gb": round(x.numel() * 4 / 1e9, 2), "generate_s": round(time.perf_counter() - t, 1)}
    exact = ExactIndex(x)
    single_ms, batch_ms, truth = query_times(exact, q, single)
    out["exact"] = {"single_query_ms": round(single_ms, 2), "batch_ms_per_query": round(batch_ms, 3)}
    print(f"N={n}: exact {single_ms:.1f} ms/query alone, {batch_ms:.2f} ms/query in a batch of {n_queries}", flush=True)
    del exact
    t = time.perf_counter()
    ivf = FaissIndex.build(x)
    out["ivf"] = {"nlist": int(ivf.index.nlist), "build_s": round(time.perf_counter() - t, 1), "by_nprobe": []}
    for p in sorted({default_nprobe(ivf.index.nlist) if p == "default" else int(p) for p in nprobes}):
        ivf.nprobe = p
        s_ms, b_ms, rows = query_times(ivf, q, single)
        r = recall_at_10(rows, truth)
        out["ivf"]["by_nprobe"].append({"nprobe": p, "default": p == default_nprobe(ivf.index.nlist), "recall_at_10": round(r, 4), "single_query_ms": round(s_ms, 3),
                                        "batch_ms_per_query": round(b_ms, 4)})
        print(f"  IVF nlist {ivf.index.nlist} nprobe {p}{' (default)' if p == default_nprobe(ivf.index.nlist) else ''}: recall@10 {r:.3f}, {s_ms:.2f} ms/query alone, "
              f"{b_ms:.3f} ms/query in a batch", flush=True)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    del ivf, x
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--single", type=int, default=20, help="queries timed one at a time")
    ap.add_argument("--nprobe", default="8,16,32,64,default", help="lists probed; default: search_index.default_nprobe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = [run_size(n, args.dim, args.queries, args.single, args.nprobe.split(","))
               for n in sizes]
    record = {
        "what": "exact vs FAISS IVF-Flat search on clustered synthetic unit vectors (benchmarks/search_scale.py)",
        "threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "faiss": faiss.__version__, "default_nlist": {str(n): default_nlist(n) for n in sizes},
        "load_avg_before": list(load_before), "sizes": results, "load_avg_after": list(os.getloadavg()),
    }
    write_record(args.json, record, load_before)


if __name__ == "__main__":
    main()
