"""How many IVF lists for fast-scan codes: recall@10 and QPS per core over (K, nprobe, k_factor) on bench_index's data.

    python bench/sweep_ivf_lists.py --n 1000000 4096:256:SQ8 16384:256:SQ8 1024:128:SQ8

Each spec K:m:REFINE builds IVF{K},PQ{m}x4fs with a Refine(REFINE) (or none) over the same synthetic collection and
held-out text queries as bench/bench_index.py (seed 0), trains spherical k-means (10 iterations, an HNSW graph of
the centroids as the k-means assigner from K = 16384), and prints one line per (nprobe, k_factor): recall@10 against
exact search and batched QPS at one thread. At K >= 16384 it also searches through an HNSW32 graph of the same
centroids (efSearch 64 and 256) next to the scan. The data behind docs/search.md, "How many lists". Holds the whole
collection in RAM (N x d float32): a measuring tool, not a build. Writes nothing; a rerun gives the same recall.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_index as B  # noqa: E402 -- the benchmark's data generator

NPROBES = (8, 16, 24, 32, 48, 64, 96, 128)
K_FACTORS = (8, 16, 24, 32)


def collection(cfg: B.BenchConfig, mix: B.Mixture) -> np.ndarray:
    """bench_index.write_collection's vectors, in RAM (float16-rounded, as the embedding files hold them)."""
    xb = np.empty((cfg.n, cfg.dim), np.float32)
    for p, first in enumerate(range(0, cfg.n, cfg.part_rows)):
        rows, rng = min(cfg.part_rows, cfg.n - first), np.random.default_rng([cfg.seed, 1, p])
        for a in range(0, rows, 25_000):
            b = min(rows, a + 25_000)
            x, _ = mix.images(rng, b - a)
            xb[first + a:first + b] = x.astype(np.float16)
            mix.texts(rng, x)  # the captions' draws, so the stream stays bench_index's
    return xb


def qps(index, xq: np.ndarray, gt: np.ndarray, runs: int = 2) -> tuple[float, float]:
    faiss.omp_set_num_threads(1)
    best, ids = 1e9, None
    for _ in range(runs):
        t0 = time.perf_counter()
        _, ids = index.search(xq, 10)
        best = min(best, time.perf_counter() - t0)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return len(xq) / best, B.recall_at_k(ids, gt, 10)


def build(spec: str, xb: np.ndarray):
    """-> (index to search, its IVF, the scan quantizer, an HNSW quantizer of the same centroids or None)."""
    nlist, m, ref = spec.split(":")
    nlist, m, d = int(nlist), int(m), xb.shape[1]
    q = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFPQFastScan(q, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    index = ivf if ref == "none" else faiss.IndexRefine(ivf, faiss.index_factory(d, ref, faiss.METRIC_INNER_PRODUCT))
    sample = xb[np.random.default_rng(0).choice(len(xb), min(len(xb), max(64 * nlist, 100_000)), replace=False)]
    cp = faiss.ClusteringParameters()
    cp.niter, cp.max_points_per_centroid, cp.spherical = 10, 256, True
    km = faiss.Clustering(d, nlist, cp)
    km.train(sample, faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if nlist >= 16384 else faiss.IndexFlatIP(d))
    cents = faiss.vector_to_array(km.centroids).reshape(nlist, d)
    q.add(cents)
    index.train(sample)  # the PQ (and the refine); the quantizer is trained already
    hq = None
    if nlist >= 16384:
        hq = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        hq.add(cents)
        hq.hnsw.efSearch = 64
        ivf.quantizer = hq  # adding through the graph: a scan of K centroids per vector is the slow part
    for a in range(0, len(xb), 100_000):
        index.add(xb[a:a + 100_000])
    ivf.quantizer = q
    return index, ivf, q, hq, ref != "none"


def sweep(spec: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray) -> None:
    t0 = time.time()
    index, ivf, q, hq, refined = build(spec, xb)
    print(f"{spec} built in {time.time() - t0:.0f} s", flush=True)
    variants = [("scan", q, 0)] + ([("hnsw64", hq, 64), ("hnsw256", hq, 256)] if hq is not None else [])
    for name, quantizer, ef in variants:
        ivf.quantizer = quantizer
        if ef:
            hq.hnsw.efSearch = ef
        for nprobe in (p for p in NPROBES if p <= ivf.nlist):
            ivf.nprobe = nprobe
            for kf in K_FACTORS if refined else (1,):
                if refined:
                    index.k_factor = kf
                s, r = qps(index, xq, gt)
                print(f"  {spec}:{name} nprobe={nprobe} kf={kf} recall={r:.4f} qps1={s:.0f}", flush=True)
    ivf.quantizer = q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="+", help="K:m:REFINE, e.g. 4096:256:SQ8 (REFINE none: no refine)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    a = ap.parse_args(argv)
    cfg = B.BenchConfig(n=a.n, dim=a.dim, queries=1000)
    mix = B.Mixture(cfg.dim, cfg.num_clusters, cfg.seed)
    xb = collection(cfg, mix)
    xq = B.held_out_queries(cfg, mix).astype(np.float16).astype(np.float32)
    flat = faiss.IndexFlatIP(cfg.dim)
    flat.add(xb)
    gt = flat.search(xq, 10)[1]
    del flat
    for spec in a.specs:
        sweep(spec, xb, xq, gt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
