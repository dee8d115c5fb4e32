"""The index builder's pieces (indexing.build is the driver, indexing.grow the on-disk and --add paths): the config,
the GPU wrapper, training and adding streamed from an EMBED_DIR's parts, and `finish` (tune on the tune queries,
write the index, measure on the held-out queries, write the report, commit the build). Reads and writes what
indexing.build's docstring says; nothing here holds more than a training sample or one add batch of vectors.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexing.faissio import read_index
from indexing.choose import HNSW_M, Choice, choose, format_bytes, new_empty, parse_bytes, \
    train_size_for
from indexing.tune import Collection, QueryFileError, QuerySample, apply_params, default_params, ground_truth, \
    load_query_file, measure, sample_queries, tune
from trainer.clip.flags import flat, opt, require
from trainer.clip.formats.atomic import atomic_write
from trainer.clip.formats.embeddings import EmbedFormatError, read_embed_manifest
from trainer.clip.formats.index import INDEX_FILE, IVFDATA_FILE, REPORT_FILE, build_dir, commit_build, new_build_id, \
    write_report

DEVICES = ("auto", "cpu", "cuda")
HNSW_ASSIGN_FROM = 2 ** 14               # K from which CPU k-means assigns through an HNSW graph of the centroids
HNSW_ASSIGN_EF = 32                     # its efSearch


@dataclass
class IndexConfig:
    """What is indexed, under which memory budget, and the recall the search must reach."""
    embeddings: str = opt("", positional=True, help="EMBED_DIR written by `clipforge embed` (embed.json, emb/, meta/)")
    out: str = opt("", required=True, help="INDEX_DIR to write (a new build, swapped in atomically)")
    memory_budget: str = opt("4GB", help="RAM the index may hold at search time, e.g. 4GB, 512MB, 1.5GiB: picks "
                                         "the index family")
    target_recall: float = opt(0.95, help="tune search parameters until recall@k on the tune queries reaches this")
    k: int = opt(10, help="the k of the tuning target recall@k (and of the QPS measurement)")
    factory: str = opt("auto", help='"auto" (the chooser) or a faiss index_factory string, e.g. "IVF4096,Flat", '
                                    '"OPQ32_128,IVF65536_HNSW32,PQ32", "HNSW32"')
    train_sample: int = opt(0, help="vectors to train on; 0: ~64 per IVF list clipped to [10k, 1M]")
    add_batch: int = opt(65_536, help="vectors read, converted to float32 and added per batch")
    tune_queries: int = opt(1000, help="caption queries to tune on (capped by the distinct captions available)")
    eval_queries: int = opt(1000, help="held-out caption queries for the report, disjoint from the tune queries")
    query_file: str = opt("", help="a .npy [Q, d] of query embeddings from your query distribution (e.g. logged "
                                   "text queries): tune and report on its rows instead of caption queries")
    device: str = opt("auto", choices=list(DEVICES), help="auto: a GPU when faiss sees one; cpu; cuda (error "
                                                           "without one)")
    on_disk: bool = opt(False, help="merge the IVF inverted lists on disk (image.ivfdata, memory-mapped at search "
                                    "time); automatic when the estimate exceeds the budget")
    add: bool = opt(False, help="append EMBED_DIR's parts not yet in INDEX_DIR's current build (a new build)")
    seed: int = opt(0, help="seed of the training sample and the query samples")
    flat_max: int = opt(100_000, help="auto: exact Flat search only up to this many vectors")
    hnsw_max: int = opt(2_000_000, help="auto: HNSW32 only up to this many vectors (its build time grows with N)")
    slice_vectors: int = opt(0, help="--on-disk: vectors per slice built in RAM before the merge; 0: from the "
                                     "budget")

    def __post_init__(self):
        try:
            parse_bytes(self.memory_budget)
        except ValueError as e:
            require(self, "memory_budget", False, str(e))
        for name in ("k", "add_batch"):
            require(self, name, getattr(self, name) >= 1, "must be >= 1")
        for name in ("train_sample", "tune_queries", "eval_queries", "slice_vectors", "flat_max", "hnsw_max"):
            require(self, name, getattr(self, name) >= 0, "must be >= 0")
        require(self, "target_recall", 0 < self.target_recall <= 1, "must be in (0, 1]")
        require(self, "factory", bool(self.factory.strip()), 'must be "auto" or a faiss factory string')
        require(self, "device", self.device in DEVICES, f"must be one of {', '.join(DEVICES)}")

    @property
    def budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)

    @classmethod
    def tiny(cls, **kw) -> "IndexConfig":
        """CPU-test preset: few queries, small batches."""
        return cls(**{"tune_queries": 64, "eval_queries": 64, "add_batch": 1024, **kw})


class BuildError(RuntimeError):
    """A user-facing error (bad paths, bad input, a refused --add): printed by main() without a traceback."""


def log(msg: str) -> None:
    print(f"index: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def new_build_folder(out: str | Path):
    """(build id, INDEX_DIR/builds/<id>/) of a new build; the folder is removed if the block fails (an
    EmbedFormatError becomes a BuildError), so a failed build leaves the current one untouched."""
    build_id = new_build_id()
    root = build_dir(Path(out).resolve(), build_id)
    root.mkdir(parents=True)
    try:
        yield build_id, root
    except EmbedFormatError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise BuildError(str(e)) from e
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ GPU
class Gpu:
    """faiss on GPU 0 when one is visible and --device allows; every method falls back to the CPU path."""

    def __init__(self, res=None):
        self.res = res

    @classmethod
    def open(cls, device: str) -> "Gpu":
        n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if device == "cpu" or (device == "auto" and n == 0):
            return cls(None)
        if n == 0:
            raise BuildError("--device cuda: faiss sees no GPU (is faiss-gpu installed instead of faiss-cpu?)")
        return cls(faiss.StandardGpuResources())

    def train(self, index, x: np.ndarray):
        """Train `index` on x: the whole index cloned to the GPU when faiss can clone and train it there; else
        (HNSW quantizer, fast-scan, refine, a code size the GPU lacks) on the CPU with a GPU flat index doing the
        k-means assignment. -> the trained CPU index."""
        if self.res is None:
            return train_on_cpu(index, x)
        try:
            g = faiss.index_cpu_to_gpu(self.res, 0, index)
            g.train(x)
            return faiss.index_gpu_to_cpu(g)
        except (RuntimeError, AttributeError) as e:  # the CPU `index` is untouched: train it below
            log(f"GPU clone of the index not possible ({str(e).strip().splitlines()[-1][:120]}): training on the "
                f"CPU with GPU k-means assignment")
        ivf = _ivf(index)
        if ivf is None:
            index.train(x)
            return index
        assigner = faiss.index_cpu_to_gpu(self.res, 0, faiss.IndexFlat(ivf.d, ivf.metric_type))
        ivf.clustering_index = assigner  # `assigner` stays referenced until training ends
        try:
            index.train(x)
        finally:
            ivf.clustering_index = None
        return index

    def adder(self, index, estimated_bytes: int):
        """A GPU clone of an IVF index to add to (None: add on the CPU) when the clone fits in free GPU memory."""
        if self.res is None or _ivf(index) is None:
            return None
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(0)
        except Exception:  # no CUDA torch in this environment: do not guess the GPU's free memory
            return None
        if estimated_bytes > 0.7 * free:
            return None
        try:
            return faiss.index_cpu_to_gpu(self.res, 0, index)
        except (RuntimeError, AttributeError):
            return None


def train_on_cpu(index, x: np.ndarray):
    """index.train(x); from K = HNSW_ASSIGN_FROM IVF lists on, k-means assigns each training vector to its centroid
    through an HNSW32 graph of the current centroids (rebuilt every iteration) instead of a scan of all K: the
    exact scan is N x K x d per iteration (docs/search.md, "Training")."""
    ivf = _ivf(index)
    if ivf is None or ivf.nlist < HNSW_ASSIGN_FROM or ivf.clustering_index is not None:
        index.train(x)
        return index
    assigner = faiss.IndexHNSWFlat(ivf.d, HNSW_M)  # L2: faiss's IVF k-means is L2 (spherical for inner product)
    assigner.hnsw.efSearch = HNSW_ASSIGN_EF
    log(f"k-means over K={ivf.nlist} lists assigns through an HNSW{HNSW_M} graph of the centroids "
        f"(K >= {HNSW_ASSIGN_FROM})")
    ivf.clustering_index = assigner
    try:
        index.train(x)
    finally:
        ivf.clustering_index = None
    return index


def _ivf(index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


# ------------------------------------------------------------------------------------------------ building
def read_manifest(embed_dir: str) -> tuple[Path, dict]:
    root = Path(embed_dir).resolve()
    if not embed_dir or not root.is_dir():
        raise BuildError(f"embeddings dir not found: {root} (EMBED_DIR: run `clipforge embed` first)")
    try:
        return root, read_embed_manifest(root)
    except EmbedFormatError as e:
        raise BuildError(str(e)) from e


def new_index(factory: str, d: int):
    try:
        return new_empty(factory, d)
    except ValueError as e:
        raise BuildError(str(e)) from e


def train_index(index, coll: Collection, choice: Choice, cfg: IndexConfig, gpu: Gpu):
    """Train on a seeded random sample of the collection, gathered part by part (never all vectors)."""
    ivf = _ivf(index)
    need = int(ivf.nlist) if ivf is not None else 1
    if coll.n < need:
        raise BuildError(f"factory {choice.factory!r} needs at least {need} vectors to train, got {coll.n}")
    size = choice.train_size or train_size_for(need, coll.n)
    x = coll.gather(coll.sample_ids(size, cfg.seed))
    log(f"training {choice.factory} on {len(x):,} random vectors ({format_bytes(x.nbytes)})")
    try:
        return gpu.train(index, x)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1]
        raise BuildError(f"training {choice.factory} on {len(x)} vectors failed: {reason}") from None


def add_vectors(index, coll: Collection, batch: int, with_ids: bool = False) -> None:
    """Add every vector of `coll` in batches; ids continue from index.ntotal (checked), or are given explicitly
    (with_ids: an IVF slice of a larger collection)."""
    for first, x in coll.iter_batches(batch):
        if with_ids:
            index.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
        elif first != index.ntotal:
            raise BuildError(f"vector ids out of step: the index holds {index.ntotal}, the next batch starts at "
                             f"{first}")
        else:
            index.add(x)


def make_index(cfg: IndexConfig, coll: Collection, choice: Choice, gpu: Gpu):
    """The trained, filled in-RAM index."""
    index = new_index(choice.factory, coll.d)
    if choice.needs_training or not index.is_trained:
        index = train_index(index, coll, choice, cfg, gpu)
    g = gpu.adder(index, choice.estimated_bytes)
    if g is not None:
        add_vectors(g, coll, cfg.add_batch)
        index = faiss.index_gpu_to_cpu(g)
    else:
        add_vectors(index, coll, cfg.add_batch)
    return index


def choose_for(cfg: IndexConfig, coll: Collection) -> Choice:
    try:
        c = choose(coll.n, coll.d, cfg.budget_bytes, factory=cfg.factory.strip(), flat_max=cfg.flat_max,
                   hnsw_max=cfg.hnsw_max, on_disk=cfg.on_disk, train_size=cfg.train_sample)
    except ValueError as e:
        raise BuildError(str(e)) from e
    for reason in c.reasons:
        log(reason)
    return c


# ------------------------------------------------------------------------------------------------ tune, report, commit
def split_queries(available: int, tune_n: int, eval_n: int) -> tuple[int, int]:
    """(tune, held-out) counts: as asked when enough distinct captions exist, else shared in proportion."""
    if available >= tune_n + eval_n:
        return tune_n, eval_n
    if not tune_n + eval_n:
        return 0, 0
    t = min(tune_n, max(1 if tune_n else 0, round(available * tune_n / (tune_n + eval_n))))
    return t, min(eval_n, available - t)


def query_sample(cfg: IndexConfig, d: int, coll: Collection | None = None) -> tuple[QuerySample, str]:
    """(the tune + held-out queries, where they come from): --query-file's rows, else caption text embeddings of
    `coll`. With coll=None only the query file is checked (cheaply, before hours of training)."""
    count = cfg.tune_queries + cfg.eval_queries
    if cfg.query_file:
        try:
            return load_query_file(cfg.query_file, d, count if coll is not None else 1, cfg.seed), "query-file"
        except QueryFileError as e:
            raise BuildError(str(e)) from None
    if coll is None:
        return QuerySample(np.zeros((0, d), np.float32), np.zeros(0, np.int64)), "caption"
    return sample_queries(coll, count, cfg.seed), "caption"


def _write_index(index, path: Path) -> None:
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def finish(cfg: IndexConfig, index, coll: Collection, choice: Choice, root: Path, build_id: str, base: dict,
           t0: float, gpu: Gpu) -> dict:
    """Tune on the tune queries, write the index, measure on the held-out queries, write the report, commit."""
    if index.ntotal != coll.n:
        raise BuildError(f"the index holds {index.ntotal} vectors, the collection {coll.n}")
    qs, kind = query_sample(cfg, coll.d, coll)
    n_tune, n_eval = split_queries(len(qs.x), cfg.tune_queries, cfg.eval_queries)
    x_tune, x_eval = qs.x[:n_tune], qs.x[n_tune:n_tune + n_eval]
    k = min(cfg.k, coll.n)
    log(f"ground truth for {n_tune} tune + {n_eval} held-out {kind} queries over {coll.n:,} vectors")
    truth = ground_truth(coll, np.concatenate([x_tune, x_eval]), min(coll.n, 2 * max(k, 100)), cfg.add_batch,
                         gpu.res)
    tuned = tune(index, choice.params_to_tune, x_tune, truth.head(n_tune), k, cfg.target_recall, choice.nlist)
    params = tuned.params if n_tune else default_params(choice.params_to_tune, choice.nlist)
    apply_params(index, params)
    log(tuned.note)
    _write_index(index, root / INDEX_FILE)
    searched = read_index(root / INDEX_FILE, same_dir=False) if choice.on_disk else index  # as searched
    held = measure(searched, x_eval, truth.tail(n_eval), coll.n, k)
    files = {p.name: p.stat().st_size for p in (root / INDEX_FILE, root / IVFDATA_FILE) if p.is_file()}
    report = {"choice": choice.to_dict(), "num_vectors": coll.n, "dim": coll.d, "search_params": params,
              "tuning": {"k": k, "target_recall": cfg.target_recall, "queries": n_tune, "query_source": kind,
                         "reached": tuned.reached,
                         f"recall@{k}": None if np.isnan(tuned.recall) else tuned.recall, "note": tuned.note,
                         "trials": tuned.trials},
              "held_out": held, "index_bytes": sum(files.values()), "files": files,
              "build_seconds": round(time.time() - t0, 3)}
    write_report(root / REPORT_FILE, report, build_id, base["weights_sha256"])
    info = {**base, "dim": coll.d, "num_vectors": coll.n, "factory": choice.factory, "metric": "inner_product",
            "search_params": params, "choice": choice.to_dict(), "on_disk": choice.on_disk,
            "parts": [s.record() for s in coll.sources], "build_seconds": report["build_seconds"],
            "config": flat(cfg)}
    info = commit_build(Path(cfg.out).resolve(), build_id, info)
    return {**info, "report": {**report, "build_id": build_id}}


def base_info(embed_dir: Path, manifest: dict) -> dict:
    """The index.json fields that come from embed.json."""
    return {"weights_sha256": str(manifest.get("weights_sha256", "")), "checkpoint": manifest.get("checkpoint"),
            "embeddings": str(embed_dir), "shards_dir": manifest.get("shards_dir")}


