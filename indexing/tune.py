"""The vectors of an index build, read part by part, and what is measured on them: text queries, exact ground
truth, search-parameter tuning to a recall target, and the held-out report.

    coll = Collection.from_embed_dir(embed_dir)              # the embedded rows of an EMBED_DIR, in part order
    qs = sample_queries(coll, 2000, seed=0)                  # caption text embeddings, distinct captions
    gt = ground_truth(coll, qs.x, depth=200)                 # exact inner-product top-depth, streamed
    result = tune(index, ["nprobe"], qs.x[:1000], gt.head(1000), k=10, target=0.95)
    metrics = measure(index, qs.x[1000:], gt.tail(1000), n=coll.n, k=10)

Reads EMBED_DIR parts through the embeddings contract (npy memory maps, the meta parquet's embedded / caption
columns); writes nothing. Vector id i is the i-th embedded row of the collection, parts in order; no step holds
more than one batch of vectors (plus the queries and their running top-depth) in memory.

Recall is tie-aware: a returned id counts as correct for query q if its exact score is >= the k-th exact score of
q minus 1e-6 (equal-score alternatives are not penalised). Exact scores are known for the ids in the ground-truth
list (depth >= k); when the list ends inside a run of ties, a returned id outside it counts if the score the index
returned for it is >= that threshold.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.clip.formats.embeddings import EmbedFormatError, EmbedPart, embed_parts, part_paths, read_embed_manifest, \
    read_part_info

TIE_EPS = 1e-6


# ------------------------------------------------------------------------------------------------ the collection
def part_fingerprint(part: EmbedPart) -> str:
    """What identifies a part's content: a hash of its meta parquet's part_info (else of its size)."""
    info = read_part_info(part.meta)
    if info is None:
        info = {"meta_bytes": part.meta.stat().st_size if part.meta.is_file() else -1}
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Source:
    """One embed part's embedded rows: vector ids base .. base + part.embedded - 1."""
    embed_dir: str   # absolute
    part: EmbedPart
    base: int
    fingerprint: str
    shards_dir: str = ""

    @property
    def count(self) -> int:
        return self.part.embedded

    def record(self) -> dict:
        """What index.json keeps about the part (incremental add compares against it)."""
        return {"embeddings": self.embed_dir, "id": self.part.id, "rows": self.part.rows,
                "embedded": self.part.embedded, "fingerprint": self.fingerprint, "shards_dir": self.shards_dir}


def to_float32(a: np.ndarray) -> np.ndarray:
    """float16 / float32 rows -> contiguous float32, re-normalised (zero rows stay zero)."""
    x = np.array(a, dtype=np.float32, order="C", copy=True)  # never a view of the read-only memory map
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class Collection:
    """The vectors of a build: the embedded rows of a list of parts, ids contiguous in part order."""

    def __init__(self, sources: list[Source], dim: int):
        self.sources, self.d = list(sources), int(dim)
        expect = self.sources[0].base if self.sources else 0
        for s in self.sources:
            if s.base != expect:
                raise EmbedFormatError(f"part {s.part.id} of {s.embed_dir}: ids start at {s.base}, expected {expect}")
            expect += s.count
        self.first = self.sources[0].base if self.sources else 0
        self.n = expect - self.first
        self._starts = np.array([s.base for s in self.sources], dtype=np.int64)

    @classmethod
    def from_embed_dir(cls, embed_dir: str | Path, manifest: dict | None = None, base: int = 0,
                       skip: set[int] = frozenset()) -> "Collection":
        """The parts an EMBED_DIR's manifest lists (but those in `skip`), ids from `base`."""
        root = Path(embed_dir).resolve()
        m = manifest or read_embed_manifest(root)
        sources = []
        for part in embed_parts(root, m):
            if part.id in skip:
                continue
            sources.append(Source(str(root), part, base, part_fingerprint(part), str(m.get("shards_dir") or "")))
            base += part.embedded
        return cls(sources, int(m["dim"]))

    @classmethod
    def from_records(cls, records: list[dict], dim: int) -> "Collection":
        """The parts an index.json lists (see Source.record), ids from 0."""
        sources, base = [], 0
        for r in records:
            img, txt, meta = part_paths(r["embeddings"], int(r["id"]))
            part = EmbedPart(int(r["id"]), "", int(r["rows"]), int(r["embedded"]), img, txt, meta)
            sources.append(Source(r["embeddings"], part, base, r["fingerprint"], r.get("shards_dir", "")))
            base += part.embedded
        return cls(sources, dim)

    def __add__(self, other: "Collection") -> "Collection":
        return Collection(self.sources + other.sources, self.d)

    def rows(self, src: Source) -> np.ndarray:
        """int64 row numbers of the part's embedded rows (checked against the manifest's count)."""
        mask = src.part.embedded_mask()
        rows = np.flatnonzero(mask)
        if len(rows) != src.count:
            raise EmbedFormatError(f"{src.part.meta}: {len(rows)} embedded rows, the manifest says {src.count}")
        return rows

    def load(self, src: Source, which: str = "img") -> np.ndarray:
        a = src.part.load(which)
        if a.shape[1] != self.d:
            raise EmbedFormatError(f"{src.part.img if which == 'img' else src.part.txt}: dim {a.shape[1]}, the "
                                   f"collection's is {self.d}")
        return a

    def iter_batches(self, batch: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first vector id, float32 [b, d]) over every vector, at most `batch` rows at a time."""
        for src in self.sources:
            if not src.count:
                continue
            a, rows = self.load(src), self.rows(src)
            dense = len(rows) == src.part.rows
            for i in range(0, len(rows), batch):
                x = to_float32(a[i:i + batch] if dense else a[rows[i:i + batch]])
                if not np.isfinite(x).all():
                    raise EmbedFormatError(f"{src.part.img}: non-finite values in rows {i}..{i + len(x) - 1}")
                yield src.base + i, x

    def gather(self, ids: np.ndarray, which: str = "img") -> np.ndarray:
        """float32 [len(ids), d]: the vectors of the given vector ids (any order), read part by part."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), self.d), dtype=np.float32)
        where = np.searchsorted(self._starts, ids, side="right") - 1
        for j in np.unique(where):
            src, sel = self.sources[j], np.flatnonzero(where == j)
            local = self.rows(src)[ids[sel] - src.base]
            out[sel] = to_float32(self.load(src, which)[local])
        return out

    def sample_ids(self, size: int, seed: int) -> np.ndarray:
        """`size` distinct vector ids drawn uniformly (seeded), sorted."""
        size = min(size, self.n)
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(self.n, size=size, replace=False)).astype(np.int64) + self.first


# ------------------------------------------------------------------------------------------------ queries
@dataclass
class QuerySample:
    x: np.ndarray                          # float32 [Q, d] text embeddings
    ids: np.ndarray                        # int64 [Q]: the vector id of each caption's own image
    captions: list[str] = field(default_factory=list)


def sample_queries(coll: Collection, count: int, seed: int, oversample: int = 4) -> QuerySample:
    """Up to `count` text embeddings of a seeded random sample of embedded rows with non-empty, distinct
    captions: every row gets a seeded random key; the `oversample * count` smallest keys are kept while streaming
    the parts, then duplicates of a caption are dropped in key order."""
    import pyarrow.parquet as pq

    keep = max(1, oversample * count)
    best_key, best_id, best_cap = np.zeros(0), np.zeros(0, np.int64), np.zeros(0, dtype=object)
    for j, src in enumerate(coll.sources):
        if not count or not src.count:
            continue
        t = pq.read_table(src.part.meta, columns=["caption", "embedded"])
        embedded = t.column("embedded").to_numpy(zero_copy_only=False).astype(bool)
        captions = np.array([(c or "").strip() for c in t.column("caption").to_pylist()], dtype=object)
        rows = np.flatnonzero(embedded)
        ok = np.flatnonzero(captions[rows] != "")  # positions among the embedded rows
        keys = np.random.default_rng([seed, j, src.part.id]).random(len(ok))
        best_key = np.concatenate([best_key, keys])
        best_id = np.concatenate([best_id, src.base + ok])
        best_cap = np.concatenate([best_cap, captions[rows[ok]]])
        if len(best_key) > keep:
            top = np.argpartition(best_key, keep)[:keep]
            best_key, best_id, best_cap = best_key[top], best_id[top], best_cap[top]
    order = np.argsort(best_key, kind="stable")
    seen, picked = set(), []
    for i in order:
        if best_cap[i] not in seen:
            seen.add(best_cap[i])
            picked.append(i)
    ids = best_id[picked]
    x = coll.gather(ids, "txt") if len(ids) else np.zeros((0, coll.d), np.float32)
    good = np.flatnonzero(np.linalg.norm(x, axis=1) > 0)[:count]  # a zero text row cannot be a query
    return QuerySample(x[good], ids[good], [best_cap[picked[i]] for i in good])


class QueryFileError(ValueError):
    """A --query-file that cannot be used (missing, not [Q, d] numbers, wrong d, too few usable rows)."""


def load_query_file(path: str | Path, d: int, count: int, seed: int) -> QuerySample:
    """Up to `count` rows of a .npy of query embeddings [Q, d] (e.g. logged text queries of the service), in a
    seeded random order (a log is chronological), L2-normalised; zero and non-finite rows are dropped. Raises
    QueryFileError with the reason."""
    p = Path(path)
    if count <= 0:
        return QuerySample(np.zeros((0, d), np.float32), np.zeros(0, np.int64))
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise QueryFileError(f"query file {p}: cannot read a .npy array ({e})") from None
    if a.ndim != 2 or a.shape[1] != d or a.dtype.kind != "f":
        raise QueryFileError(f"query file {p}: expected float rows of dimension {d}, got {a.dtype} {a.shape}")
    rng = np.random.default_rng([seed, 1])
    take = np.sort(rng.choice(len(a), size=min(len(a), 2 * count), replace=False))  # spare rows for bad ones
    x = np.asarray(a[take], dtype=np.float32)[rng.permutation(len(take))]
    norms = np.linalg.norm(x, axis=1)
    good = np.flatnonzero(np.isfinite(norms) & (norms > 0))[:count]
    if not len(good):
        raise QueryFileError(f"query file {p}: no finite, non-zero row among {len(a)}")
    return QuerySample(x[good] / norms[good, None], np.full(len(good), -1, np.int64))


# ------------------------------------------------------------------------------------------------ ground truth
@dataclass
class Truth:
    scores: np.ndarray  # float32 [Q, D] exact inner products, descending
    ids: np.ndarray     # int64 [Q, D]

    def head(self, q: int) -> "Truth":
        return Truth(self.scores[:q], self.ids[:q])

    def tail(self, q: int) -> "Truth":
        return Truth(self.scores[len(self.scores) - q:], self.ids[len(self.ids) - q:])


def _knn(xq: np.ndarray, xb: np.ndarray, k: int, gpu) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    if gpu is not None:
        return faiss.knn_gpu(gpu, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)


def ground_truth(coll: Collection, xq: np.ndarray, depth: int, batch: int = 65_536, gpu=None) -> Truth:
    """Exact inner-product top-`depth` (capped at N) of every query over every vector, one batch of vectors at a
    time merged into a running top-depth. gpu: a faiss.StandardGpuResources (faiss.knn_gpu) or None."""
    q, depth = len(xq), min(depth, coll.n)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    scores = np.full((q, 0), -np.inf, dtype=np.float32)
    ids = np.zeros((q, 0), dtype=np.int64)
    if not q or not depth:
        return Truth(scores, ids)
    for first, xb in coll.iter_batches(batch):
        s, i = _knn(xq, xb, min(depth, len(xb)), gpu)
        s, i = np.concatenate([scores, s], axis=1), np.concatenate([ids, np.where(i >= 0, i + first, -1)], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :depth]
        scores, ids = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
    return Truth(scores, ids)


def recall_at(found_ids: np.ndarray, truth: Truth, k: int, found_scores: np.ndarray | None = None,
              eps: float = TIE_EPS) -> float:
    """Mean over queries of |correct among the first k found| / k, tie-aware (see the module docstring).
    found_ids: int64 [Q, >=k] (-1 = no result); k is capped at the ground truth's depth."""
    if not len(found_ids):
        return float("nan")
    k = min(k, truth.scores.shape[1])
    hits = 0
    for lo in range(0, len(found_ids), 256):
        f, s, g = found_ids[lo:lo + 256, :k], truth.scores[lo:lo + 256], truth.ids[lo:lo + 256]
        thr = s[:, k - 1:k] - eps
        good = s >= thr                                               # [q, D]: ids whose exact score qualifies
        match = (f[:, :, None] == g[:, None, :])                      # [q, k, D]
        ok = (match & good[:, None, :]).any(axis=2) & (f >= 0)
        if found_scores is not None:                                  # ties running past the end of the list
            open_end = good[:, -1:]
            ok |= ~match.any(axis=2) & open_end & (found_scores[lo:lo + 256, :k] >= thr) & (f >= 0)
        hits += int(ok.sum())
    return hits / (len(found_ids) * k)


# ------------------------------------------------------------------------------------------------ tuning
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
K_FACTORS = (1, 2, 4, 8, 16, 32, 64, 128)
QEF_MULT = (1, 2, 4)
PLATEAU = 0.01  # target out of reach: settle for the cheapest setting within 1% of the best recall
GAIN_MIN = 0.001  # recall gained by doubling nprobe / efSearch below which the search up the grid stops
MARGIN_Z = 1.645  # one-sided 95 %: the tuner aims this many standard errors of the tune estimate above the target


def recall_margin(target: float, queries: int, k: int, z: float = MARGIN_Z) -> float:
    """How far above `target` to aim so that recall on other queries still reaches it: z binomial standard errors
    of a recall@k estimated from `queries` x k results (at the target rate)."""
    return z * math.sqrt(max(target * (1 - target), 0.0) / max(1, queries * k))


@dataclass
class TuneResult:
    params: dict
    recall: float          # recall@k on the tune set at `params`
    reached: bool
    trials: list[dict]     # every setting tried: params, recall, ms per query (batched)
    note: str


def apply_params(index, params: dict) -> None:
    """Set search parameters by faiss ParameterSpace name (nprobe, quantizer_efSearch, efSearch, k_factor_rf)."""
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, float(value) if name == "k_factor_rf" else int(value))


def _primary(names: list[str], nlist: int, k: int) -> tuple[str, list[int]]:
    if "nprobe" in names:
        grid = sorted({v for i in range(22) for v in (1 << i, 3 << i >> 1) if 1 <= v <= nlist} | {nlist})
        return "nprobe", grid
    return "efSearch", sorted({max(v, k) for v in EF_GRID})


def _settings(names: list[str], primary: str, value: int, combo: tuple) -> dict:
    params = {primary: value}
    extra = dict(zip([n for n in names if n != primary], combo))
    if "quantizer_efSearch" in extra:
        params["quantizer_efSearch"] = max(16, extra["quantizer_efSearch"] * value)
    if "k_factor_rf" in extra:
        params["k_factor_rf"] = extra["k_factor_rf"]
    return params


def evaluate(index, params: dict, xq: np.ndarray, truth: Truth, k: int) -> dict:
    apply_params(index, params)
    t0 = time.perf_counter()
    scores, ids = index.search(xq, k)
    ms = (time.perf_counter() - t0) * 1000 / max(1, len(xq))
    return {"params": dict(params), "recall": round(recall_at(ids, truth, k, scores), 6), "ms_per_query": ms}


def _first_reaching(run, combo: tuple, start: int, size: int, target: float, cost_cap: float):
    """Exponential search up the primary grid from `start` (each step about doubles the value): -> (the first
    index reaching `target`, the last index tried below it, or -1), or None when it stops short: the end of the
    grid, a plateau (doubling gained < GAIN_MIN recall) or a trial costing more than `cost_cap` (a setting already
    known to reach: every larger value costs more still). No trial at nprobe = nlist -- a full scan, hours at 100M
    vectors -- unless the smaller ones keep gaining recall and stay cheaper than what already reaches."""
    i, failed, prev = start, -1, -1.0
    while True:
        t = run(i, combo)
        if t["recall"] >= target:
            return i, failed
        if i == size - 1 or t["ms_per_query"] > cost_cap or (prev >= 0 and t["recall"] - prev < GAIN_MIN):
            return None
        failed, prev, i = i, t["recall"], min(size - 1, i + 2)


def _bisect(run, size: int, axes: list, target: float) -> None:
    """For each combination of the secondary axes, evaluate (through `run`, which caches) the smallest primary
    index in [0, size) reaching `target`: an exponential search from the previous combination's answer, then a
    bisection below what it found; later combinations stop where they cost more than a setting that reaches."""
    start, cost_cap = 0, math.inf
    for combo in itertools.product(*axes):
        found = _first_reaching(run, combo, start, size, target, cost_cap)
        if found is None:
            continue
        top, lo = found[0], found[1] + 1
        while lo < top:
            mid = (lo + top) // 2
            lo, top = (lo, mid) if run(mid, combo)["recall"] >= target else (mid + 1, top)
        start, cost_cap = top, min(cost_cap, run(top, combo)["ms_per_query"])


def tune(index, names: list[str], xq: np.ndarray, truth: Truth, k: int, target: float, nlist: int = 0) -> TuneResult:
    """The cheapest setting (measured ms per query, batched, on xq) of the parameters `names` whose recall@k on
    xq reaches `target` plus recall_margin (so that other queries reach the target too; when only the target
    itself is reachable, the cheapest setting reaching it). For each combination of the secondary parameters
    (k_factor_rf, quantizer_efSearch as a multiple of nprobe), the smallest primary value (nprobe or efSearch)
    reaching the aim is found by bisection (recall grows with it). When no setting reaches the target, the best
    recall found is the plateau: the cheapest setting within PLATEAU of it is taken (not simply the most expensive
    one), and the note says so."""
    names = [n for n in names if n in ("nprobe", "quantizer_efSearch", "efSearch", "k_factor_rf")]
    if not names or not len(xq):
        t = evaluate(index, {}, xq, truth, k) if len(xq) else {"params": {}, "recall": float("nan")}
        note = "nothing to tune" if not names else "no tuning queries: default search parameters"
        return TuneResult({}, t["recall"], bool(t["recall"] >= target), [t] if len(xq) else [], note)
    primary, grid = _primary(names, nlist, k)
    axes = [K_FACTORS if n == "k_factor_rf" else QEF_MULT for n in names if n != primary]
    cache: dict[tuple, dict] = {}

    def run(i: int, combo: tuple) -> dict:
        params = _settings(names, primary, grid[i], combo)
        key = tuple(sorted(params.items()))  # combos can coincide (quantizer_efSearch has a floor)
        if key not in cache:
            cache[key] = evaluate(index, params, xq, truth, k)
        return cache[key]

    aim = min(1.0, target + recall_margin(target, len(xq), k))
    _bisect(run, len(grid), axes, aim)
    goal, reached = aim, any(t["recall"] >= aim for t in cache.values())
    if not reached:
        _bisect(run, len(grid), axes, target)
        goal, reached = target, any(t["recall"] >= target for t in cache.values())
    if not reached:
        top = max(t["recall"] for t in cache.values())
        goal = top * (1 - PLATEAU)
        _bisect(run, len(grid), axes, goal)
    trials = list(cache.values())
    best = min((t for t in trials if t["recall"] >= goal), key=lambda t: t["ms_per_query"])
    if reached:
        margin = (f" + {aim - target:.4f} margin for the tune sample ({len(xq)} queries)" if goal == aim else
                  f" (the {aim - target:.4f} margin for the tune sample not reached)")
        note = f"cheapest setting with tune recall@{k} >= {target}{margin}: {best['params']}"
    else:
        note = (f"target recall@{k} {target} not reached on the tune queries (best {top:.4f}): took the cheapest "
                f"setting within {PLATEAU:.0%} of the best, {best['params']} at {best['recall']:.4f}")
    return TuneResult(best["params"], best["recall"], reached, trials, note)


def default_params(names: list[str], nlist: int) -> dict:
    """What an untuned index searches with (no caption queries to tune on)."""
    out = {}
    if "nprobe" in names:
        out["nprobe"] = min(max(nlist, 1), 16)
    if "quantizer_efSearch" in names:
        out["quantizer_efSearch"] = max(16, 2 * out.get("nprobe", 16))
    if "efSearch" in names:
        out["efSearch"] = 64
    if "k_factor_rf" in names:
        out["k_factor_rf"] = 4
    return out


# ------------------------------------------------------------------------------------------------ the report
def measure(index, xq: np.ndarray, truth: Truth, n: int, k: int) -> dict:
    """Held-out metrics at the index's current parameters: recall@1/10/100 (depths capped at N; each its own
    search), QPS batched (all queries in one call) and single-query (one at a time), p50/p99 latency in ms."""
    out: dict = {"queries": int(len(xq))}
    if not len(xq):
        return out
    depths = {1: 1, 10: 10, 100: 100}
    for name, depth in depths.items():
        depth = min(depth, n)
        scores, ids = index.search(xq, depth)
        out[f"recall@{name}"] = round(recall_at(ids, truth, depth, scores), 6)
    out["recall_depths"] = [min(d, n) for d in depths.values()]
    kk = min(k, n)
    t0 = time.perf_counter()
    index.search(xq, kk)
    out["qps_batched"] = round(len(xq) / max(time.perf_counter() - t0, 1e-9), 1)
    lat = []
    for row in xq:
        t0 = time.perf_counter()
        index.search(row[None], kk)
        lat.append((time.perf_counter() - t0) * 1000)
    out["qps_single"] = round(1000 * len(lat) / max(sum(lat), 1e-9), 1)
    out["latency_ms_p50"] = round(float(np.percentile(lat, 50)), 4)
    out["latency_ms_p99"] = round(float(np.percentile(lat, 99)), 4)
    return out
