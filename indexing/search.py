"""Text, image and embedding search over a versioned index dir (clipforge.index.v2, trainer.clip.formats.index).

    python -m indexing.search "a red apple" ["query 2" ...] --index INDEX_DIR [--image FILE ...] [--k 5]
                              [--columns width,height] [--filter "width >= 256"] [--dedup 0.95] [--json]

    from indexing.search import Searcher
    s = Searcher("runs/index")
    hits = s.search("a red apple", k=5)[0]                       # list[Hit], cosine score descending
    res = s.search(["a dog", Path("q.jpg"), jpg_bytes, pil_image, vector], k=5, columns=["width"],
                   filter="width >= 256 AND caption ILIKE '%dog%'", dedup=0.95)   # one list of Hits per query
    res.notes                                                    # what was skipped or limited (dedup, candidates)
    jpg = s.image_bytes(hits[0])                                 # the original bytes, from the shard tar

A query is text (a str: always text), an image (a pathlib.Path, bytes, or a PIL image) or an embedding (a numpy array
[D], or [Q, D] for Q of them; normalised here). Reads INDEX_DIR/index.json and the build it names (open_index_set
refuses a mismatched set), the FAISS index memory-mapped, the hits' rows of metadata.arrow (memory-mapped Arrow IPC;
builds without it: metadata.parquet a row group at a time through a bounded LRU), and the checkpoint only on the first
text or image query (its weights hash must be the index's): an embedding-only user never needs it. A filter (the
language of indexing.serve_filter) is evaluated by DuckDB into an allowed-id bitmap; the search then either widens k
(x4 a round) or, when few ids are allowed, hands the bitmap to faiss as an IDSelectorBitmap. Writes nothing but
DuckDB's spill files. Concurrent unfiltered searches (threads of a service) are coalesced into one batched FAISS
search (indexing.coalesce). Searching is read-only: a rerun gives the same results; a rebuild is seen by a new
Searcher.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from indexing import faissio
from indexing.coalesce import Coalescer
from indexing.serve_filter import FilterCache, FilterError, IdSet, selector_params
from trainer.clip.flags import CLI, opt, require, run_main, section
from trainer.clip.formats.index import ROWS_FILE, IndexFormatError, open_index_set

MAX_IMAGE_PIXELS = 64_000_000  # a query image larger than this (decoded) is refused before it is decoded
IMAGE_BATCH = 32
FILTER_STRATEGIES = ("auto", "widen", "selector")
BASE_COLUMNS = ("key", "caption", "url", "shard", "member", "offset", "size")


@dataclass
class Hit:
    rank: int           # 1-based
    score: float        # cosine similarity (inner product of normalised vectors)
    key: str
    caption: str
    url: str
    image: str          # "shard-00000.tar#000000012.jpg"
    id: int = -1        # vector id == metadata row
    shard: str = ""     # tar path relative to the index's shards_dir
    offset: int = 0     # byte offset of the image data in the tar
    size: int = 0       # image size in bytes
    extra: dict = field(default_factory=dict)  # the metadata columns asked for with columns=


class SearchError(RuntimeError):
    """A user-facing error: a missing or mismatched index dir, a checkpoint that cannot be loaded."""


class QueryError(SearchError, ValueError):
    """A bad query: an undecodable image, a wrong embedding, an unknown column, a bad filter (HTTP 400)."""


class Results(list):
    """list[list[Hit]] (one list per query) with `notes` (what was skipped or limited) and `methods` (per query:
    "plain", "widen" = a filter / dedup applied by widening k, "selector" = a faiss id selector, "empty")."""

    def __init__(self, hits: list[list[Hit]], notes: list[str], methods: list[str]):
        super().__init__(hits)
        self.notes, self.methods = notes, methods


@dataclass
class SearchOptions:
    """How a search filters, widens and caches."""
    filter_strategy: str = opt("auto", choices=FILTER_STRATEGIES, help="how a filter restricts the search: widen k "
                               "until enough allowed hits, a faiss id selector, or auto (the selector when few ids "
                               "are allowed and the index type takes one)")
    selector_fraction: float = opt(0.05, help="auto uses the id selector when a filter allows at most this "
                                              "fraction of the vectors")
    max_candidates: int = opt(100_000, help="the most neighbours a filtered / deduplicated search looks through")
    max_filter_chars: int = opt(1000, help="the longest filter expression accepted")
    filter_cache: int = opt(16, help="how many filters' allowed-id bitmaps (N/8 bytes each) are kept (LRU)")
    duckdb_memory: str = opt("1GB", help="DuckDB memory_limit for filter evaluation (it spills to disk beyond)")
    duckdb_temp_dir: str = opt("", help="DuckDB spill dir (default: clipforge-filter-duckdb in the system temp dir)")
    meta_cache: int = opt(32, help="decoded metadata column chunks (one row group of one column each) kept (LRU)")
    coalesce: int = opt(256, help="concurrent unfiltered searches run as one batch of up to this many queries "
                                  "(indexing.coalesce); 0: each search on its own")

    def __post_init__(self):
        for name in ("max_candidates", "max_filter_chars", "filter_cache", "meta_cache"):
            require(self, name, getattr(self, name) >= 1, "must be >= 1")
        require(self, "coalesce", self.coalesce >= 0, "must be >= 0")
        require(self, "selector_fraction", 0 <= self.selector_fraction <= 1, "must be in [0, 1]")
        require(self, "filter_strategy", self.filter_strategy in FILTER_STRATEGIES,
                f"must be one of {', '.join(FILTER_STRATEGIES)}")
        require(self, "duckdb_memory", re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", self.duckdb_memory, re.I) is not None,
                "must be a size such as 512MB or 4GB")


# ----------------------------------------------------------------------------------------------- reading
def read_index(path: str | Path, mmap: bool = True) -> faiss.Index:
    """indexing.faissio.read_index, with its errors as SearchError."""
    try:
        return faissio.read_index(path, mmap=mmap)
    except IndexFormatError as e:
        raise SearchError(str(e)) from e


class MetadataReader:
    """Rows of a build's metadata by vector id (= row). From metadata.arrow when the build has it: memory-mapped
    Arrow IPC, a lookup touches only the pages of the rows asked for. Else (builds from before it) from
    metadata.parquet, a row group and a column at a time, with a bounded LRU of decoded chunks: memory is
    meta_cache chunks, whatever the row count."""

    def __init__(self, path: str | Path, cache: int = 32):
        rows_file = Path(path).with_name(ROWS_FILE)
        self.ipc = pa.ipc.open_file(pa.memory_map(str(rows_file))) if rows_file.is_file() else None
        if self.ipc is not None:  # the batches' buffers stay views of the mapped file; get_batch parses each anew
            self.columns = list(self.ipc.schema.names)
            self.batches = [self.ipc.get_batch(i) for i in range(self.ipc.num_record_batches)]
            sizes = [b.num_rows for b in self.batches]
        else:
            self.file = pq.ParquetFile(path, memory_map=True)
            meta = self.file.metadata
            self.columns = list(self.file.schema_arrow.names)
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.starts = np.cumsum([0] + sizes)
        self.num_rows = int(self.starts[-1])
        self.size, self.cache, self.lock = cache, OrderedDict(), threading.Lock()

    def _chunk(self, group: int, column: str) -> pa.Array:
        key = (group, column)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        chunk = self.file.read_row_group(group, columns=[column]).column(0).combine_chunks()
        self.cache[key] = chunk
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return chunk

    def rows(self, ids, columns) -> list[dict]:
        """[{column: value}] for each id (0 <= id < num_rows), in the order given."""
        ids = np.asarray(ids, np.int64)
        out: list[dict] = [{} for _ in ids]
        groups = np.searchsorted(self.starts, ids, side="right") - 1
        with self.lock:  # one reader of the file at a time; the cache is shared
            for g in np.unique(groups):
                where = np.nonzero(groups == g)[0]
                local = pa.array(ids[where] - self.starts[g], pa.int64())
                if self.ipc is not None:  # one take of the batch's columns (a take per column costs as much)
                    for j, row in zip(where, self.batches[g].select(list(columns)).take(local).to_pylist()):
                        out[j] = row
                    continue
                for c in columns:
                    for j, v in zip(where, self._chunk(int(g), c).take(local).to_pylist()):
                        out[j][c] = v
        return out


# ----------------------------------------------------------------------------------------------- queries
IMAGE_TYPES = (PurePath, bytes, bytearray, memoryview, Image.Image)


def as_batch(queries) -> list:
    """One query or a batch of them -> a list of queries (a [Q, D] array -> Q embeddings)."""
    if isinstance(queries, np.ndarray):
        if queries.ndim not in (1, 2):
            raise QueryError(f"an embedding array must be [D] or [Q, D], got shape {queries.shape}")
        return [queries] if queries.ndim == 1 else list(queries)
    if isinstance(queries, (str, *IMAGE_TYPES)):
        return [queries]
    try:
        return list(queries)
    except TypeError:
        raise QueryError(f"a {type(queries).__name__} is not a query or a list of queries") from None


def query_kind(q, j: int = 0) -> str:
    if isinstance(q, str):
        return "text"
    if isinstance(q, np.ndarray):
        return "embedding"
    if isinstance(q, IMAGE_TYPES):
        return "image"
    raise QueryError(f"query {j}: a {type(q).__name__} is neither text (str), an image (pathlib.Path, bytes, PIL "
                     f"image) nor an embedding (numpy array)")


def load_query_image(q, j: int = 0) -> Image.Image:
    """A query image (path, bytes or PIL image) -> RGB PIL image; QueryError when it cannot be read or decoded."""
    if isinstance(q, Image.Image):
        return q.convert("RGB")
    try:
        data = Path(q).read_bytes() if isinstance(q, PurePath) else bytes(q)
    except OSError as e:
        raise QueryError(f"query {j}: cannot read image {q}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise QueryError(f"query {j}: image of {img.width}x{img.height} pixels is too large")
            img.load()
            return img.convert("RGB")
    except QueryError:
        raise
    except Exception:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise QueryError(f"query {j}: the upload is not a decodable image (jpg, png, webp, ...)") from None


def normalise_embedding(q: np.ndarray, dim: int, j: int = 0) -> np.ndarray:
    try:
        x = np.asarray(q, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise QueryError(f"query {j}: an embedding must be numbers, got an array of {q.dtype}") from None
    if x.shape[0] != dim:
        raise QueryError(f"query {j}: embedding has {x.shape[0]} dimensions; the index has {dim}")
    scale = float(np.max(np.abs(x))) if len(x) else 0.0   # scaled first: huge finite values do not overflow
    if not np.isfinite(scale) or scale == 0:
        raise QueryError(f"query {j}: embedding must be a non-zero vector of finite numbers")
    x = x / scale
    return (x / np.linalg.norm(x)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- the searcher
class Searcher:
    """The current build of an index dir, ready to search (see the module docstring). Thread-safe for searching."""

    def __init__(self, index_dir: str | Path, device: str = "cpu", shards_dir: str | Path | None = None,
                 search_params: dict | None = None, mmap: bool = True, *, checkpoint: str | Path | None = None,
                 options: SearchOptions | None = None):
        self.index_dir, self.device, self.options = Path(index_dir), device, options or SearchOptions()
        try:
            self.set = open_index_set(self.index_dir)
        except IndexFormatError as e:
            raise SearchError(str(e)) from e
        self.info, self.build_id = self.set.info, self.set.build_id
        self.shards_dir = Path(shards_dir or self.info.get("shards_dir") or ".")
        self.checkpoint = str(checkpoint or self.info.get("checkpoint") or "")
        try:
            self.index = read_index(self.set.index_path, mmap=mmap)
            self.meta = MetadataReader(self.set.meta_path, self.options.meta_cache)
        except (RuntimeError, OSError, pa.ArrowException) as e:
            if isinstance(e, SearchError):
                raise
            raise SearchError(f"cannot read build {self.build_id} of {self.index_dir}: {e}") from e
        if self.index.ntotal != self.meta.num_rows:
            raise SearchError(f"{self.set.root}: the index has {self.index.ntotal} vectors but the metadata has "
                              f"{self.meta.num_rows} rows")
        self.search_params = self._apply_params({**self.info.get("search_params", {}), **(search_params or {})})
        self.can_reconstruct = self._can_reconstruct()
        self.selectable = selector_params(self.index, IdSet(np.zeros(1, np.uint8), 0)) is not None
        self._encoder: tuple | None = None
        self._filters: FilterCache | None = None
        self._lock, self._filters_lock = threading.Lock(), threading.Lock()
        self.coalescer = Coalescer(self.index.search, self.options.coalesce) if self.options.coalesce else None

    def _apply_params(self, params: dict) -> dict:
        ps, applied = faiss.ParameterSpace(), {}
        for name, value in params.items():
            try:
                ps.set_index_parameter(self.index, name, value)
                applied[name] = value
            except RuntimeError:  # e.g. nprobe on a Flat index: not applicable
                print(f"warning: search parameter {name}={value} does not apply to this index", file=sys.stderr)
        return applied

    def _can_reconstruct(self) -> bool:
        try:
            return self.num_vectors > 0 and self.index.reconstruct(0) is not None
        except RuntimeError:  # e.g. an IVF index without a direct map
            return False

    @property
    def num_vectors(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def columns(self) -> list[str]:
        return self.meta.columns

    @property
    def model_loaded(self) -> bool:
        return self._encoder is not None

    # ------------------------------------------------------------------------------------------- the model
    def _load(self) -> tuple:
        """(model, preprocess, tokenizer), loaded on first use; the checkpoint must hold the index's weights."""
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load_checkpoint()
            return self._encoder

    def _load_checkpoint(self) -> tuple:
        from trainer.clip.checkpoint import load_pretrained, weights_sha256

        want, where = self.info.get("weights_sha256"), self.checkpoint or "(none recorded)"
        try:
            got = weights_sha256(self.checkpoint)
            if want and got != want:
                raise SearchError(f"checkpoint {where} is not the one build {self.build_id} was made with (weights "
                                  f"sha256 {got[:12]}..., the index says {want[:12]}...)")
            model, preprocess, tokenizer = load_pretrained(self.checkpoint, device=self.device)
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError
            raise SearchError(f"cannot load checkpoint {where} for a text / image query: {e} (embedding queries "
                              f"need no checkpoint)") from e
        model.eval()
        return model, preprocess, tokenizer

    def load_model(self):
        """The model (loaded now if it was not yet); SearchError when the checkpoint cannot be loaded."""
        return self._load()[0]

    @property
    def model(self):
        return self._load()[0]

    def encode(self, queries: list[str]) -> np.ndarray:
        """list[str] -> float32 [Q, D] L2-normalised text embeddings."""
        from trainer.clip.encode import amp_dtype_for, encode_texts

        model, _, tokenizer = self._load()
        return encode_texts(model, tokenizer, list(queries), self.device, amp_dtype=amp_dtype_for(self.device))

    def encode_images(self, images: list) -> np.ndarray:
        """Images (paths, bytes, PIL images) -> float32 [Q, D] L2-normalised; QueryError for one that does not
        decode (checked before the model is loaded)."""
        import torch

        from trainer.clip.encode import amp_dtype_for, encode_image_batch

        decoded = [load_query_image(q, j) for j, q in enumerate(images)]
        model, preprocess, _ = self._load()
        out = [encode_image_batch(model, torch.stack([preprocess(im) for im in decoded[i:i + IMAGE_BATCH]]),
                                  self.device, amp_dtype_for(self.device)) for i in range(0, len(decoded), IMAGE_BATCH)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed(self, queries) -> np.ndarray:
        """Any queries (see the module docstring) -> float32 [Q, D] L2-normalised, in order."""
        batch = as_batch(queries)
        kinds = [query_kind(q, j) for j, q in enumerate(batch)]
        out = np.zeros((len(batch), self.dim), np.float32)
        for j, q in enumerate(batch):
            if kinds[j] == "embedding":
                out[j] = normalise_embedding(q, self.dim, j)
        for kind, encode in (("image", self.encode_images), ("text", self.encode)):
            where = [j for j, k in enumerate(kinds) if k == kind]
            if where:
                x = encode([batch[j] for j in where])
                if x.shape[1] != self.dim:
                    raise SearchError(f"the checkpoint embeds into {x.shape[1]} dimensions; the index has {self.dim}")
                out[where] = x
        return out

    # ------------------------------------------------------------------------------------------- searching
    @property
    def filters(self) -> FilterCache:
        """The filter language's evaluator over this build's metadata (created on the first filter)."""
        with self._filters_lock:
            if self._filters is None:
                o = self.options
                self._filters = FilterCache(self.set.meta_path, self.num_vectors, self.columns, o.max_filter_chars,
                                            o.filter_cache, o.duckdb_memory, o.duckdb_temp_dir)
            return self._filters

    def allowed(self, expr: str) -> IdSet:
        """The ids a filter expression allows; QueryError naming the problem when it is outside the language."""
        try:
            return self.filters.allowed(expr)
        except FilterError as e:
            raise QueryError(f"bad filter: {e}") from None

    def search(self, queries, k: int = 5, columns=(), filter: str | None = None,
               dedup: float | None = None) -> Results:
        """-> one list of up to k Hits per query, score descending (k is capped at the vector count). `columns`:
        extra metadata columns on each hit (hit.extra); `filter`: only hits whose metadata satisfies it; `dedup`: drop a
        hit whose cosine to a better one is >= dedup. QueryError for a bad query, checked before anything is encoded."""
        batch, columns = as_batch(queries), list(dict.fromkeys(columns))
        unknown = [c for c in columns if c not in self.columns]
        if unknown:
            raise QueryError(f"unknown columns {unknown} (columns: {', '.join(self.columns)})")
        if dedup is not None and not 0 < dedup <= 1:
            raise QueryError(f"dedup must be a cosine in (0, 1], got {dedup}")
        allowed = self.allowed(filter) if filter is not None else None
        notes, k = [], max(0, min(int(k), self.num_vectors))
        if dedup is not None and not self.can_reconstruct:
            notes.append(f"dedup skipped: this index ({self.info.get('factory')}) cannot reconstruct vectors")
            dedup = None
        if not batch or k == 0 or (allowed is not None and allowed.count == 0):
            return Results([[] for _ in batch], notes, ["empty"] * len(batch))
        xq = self.embed(batch)
        if allowed is None and dedup is None:
            scores, ids = (self.coalescer or self.index).search(xq, k)
            found = [(s[i >= 0], i[i >= 0], "plain") for s, i in zip(scores, ids)]
        else:
            found = [self._gather(xq[j:j + 1], k, allowed, dedup, notes) for j in range(len(batch))]
        return Results(self._hits(found, columns), list(dict.fromkeys(notes)), [m for _, _, m in found])

    def _method(self, allowed: IdSet | None) -> str:
        strategy = self.options.filter_strategy
        if allowed is None or strategy == "widen" or not self.selectable:
            return "widen"
        small = allowed.count <= self.options.selector_fraction * self.num_vectors
        return "selector" if strategy == "selector" or small else "widen"

    def _gather(self, xq: np.ndarray, k: int, allowed: IdSet | None, dedup: float | None, notes: list):
        """Top k of one query [1, D] under a filter and / or dedup -> (scores, ids, method)."""
        method = self._method(allowed)
        params = selector_params(self.index, allowed) if method == "selector" else None
        pool = allowed.count if params is not None else self.num_vectors
        cap = min(pool, max(self.options.max_candidates, k))
        kk = min(cap, k if (allowed is None or params is not None) and dedup is None else 4 * k)
        while True:
            scores, ids = self.index.search(xq, kk, params=params[0] if params else None)   # [1, kk]; -1: none
            found = ids[0] >= 0
            exhausted = int(found.sum()) < kk
            scores, ids = scores[0][found], ids[0][found]
            if allowed is not None and params is None:
                m = allowed.contains(ids)
                scores, ids = scores[m], ids[m]
            order = np.argsort(-scores, kind="stable")
            scores, ids = scores[order], ids[order]
            if dedup is not None:
                scores, ids = self._dedup(scores, ids, dedup, k)
            if len(ids) >= k or kk >= cap or exhausted:
                break
            kk = min(cap, kk * 4)
        if len(ids) < min(k, allowed.count if allowed is not None else pool) and kk >= cap and cap < pool:
            notes.append(f"looked through the nearest {cap} vectors only (max_candidates)")
        elif len(ids) < min(k, allowed.count if allowed is not None else pool) and exhausted and dedup is None:
            notes.append("the index returned fewer neighbours than asked for (an approximate index probes part of "
                         "the vectors: raise nprobe / efSearch)")
        return scores[:k], ids[:k], method

    def _dedup(self, scores: np.ndarray, ids: np.ndarray, threshold: float, k: int):
        """Greedy, in score order: drop a hit whose cosine to an already kept hit is >= threshold."""
        kept, vecs = [], np.zeros((0, self.dim), np.float32)
        for j, i in enumerate(ids):
            v = np.asarray(self.index.reconstruct(int(i)), np.float32)
            v = v / max(float(np.linalg.norm(v)), 1e-12)
            if len(vecs) and float(np.max(vecs @ v)) >= threshold:
                continue
            kept.append(j)
            vecs = np.vstack([vecs, v[None]])
            if len(kept) == k:
                break
        return scores[kept], ids[kept]

    def _hits(self, found: list, columns: list[str]) -> list[list[Hit]]:
        """(scores, ids, method) per query -> Hits, with one metadata read for all of them."""
        all_ids = np.unique(np.concatenate([ids for _, ids, _ in found])).astype(np.int64)
        names = list(dict.fromkeys([*BASE_COLUMNS, *columns]))
        rows = dict(zip(all_ids.tolist(), self.meta.rows(all_ids, names)))
        return [[_hit(r + 1, float(s), int(i), rows[int(i)], columns) for r, (s, i) in enumerate(zip(sc, ids))]
                for sc, ids, _ in found]

    def hit(self, i: int, columns=()) -> Hit:
        """Vector i's metadata row as a Hit (rank 0, score 0); IndexError outside 0..num_vectors-1."""
        if not 0 <= int(i) < self.num_vectors:
            raise IndexError(f"no vector {i}: ids are 0..{self.num_vectors - 1}")
        row = self.meta.rows([int(i)], list(dict.fromkeys([*BASE_COLUMNS, *columns])))[0]
        return _hit(0, 0.0, int(i), row, list(columns))

    def image_path(self, hit: Hit) -> str:
        """Where the image lives: SHARDS_DIR/shard-00000.tar#KEY.jpg."""
        return f"{self.shards_dir / hit.shard}#{hit.image.split('#', 1)[1]}"

    def image_bytes(self, hit: Hit) -> bytes:
        """Original image bytes of a hit, read straight from the shard tar (one seek + read)."""
        with open(self.shards_dir / hit.shard, "rb") as f:
            f.seek(hit.offset)
            data = f.read(hit.size)
        if len(data) != hit.size:
            raise OSError(f"short read from {self.shards_dir / hit.shard} at {hit.offset}: "
                          f"{len(data)}/{hit.size} bytes")
        return data


def _hit(rank: int, score: float, i: int, row: dict, columns: list[str]) -> Hit:
    key = row.get("key") or ""
    member = row.get("member") or f"{key}.jpg"
    return Hit(rank=rank, score=score, key=key, caption=row.get("caption") or "", url=row.get("url") or "",
               image=f"{row.get('shard')}#{member}", id=i, shard=row.get("shard") or "",
               offset=int(row.get("offset") or 0), size=int(row.get("size") or 0), extra={c: row[c] for c in columns})


# ----------------------------------------------------------------------------------------------- the CLI
def format_hits(query: str, hits: list[Hit], where=lambda h: h.image) -> str:
    lines = [f"query: {query}"]
    for h in hits:
        extra = "".join(f"  {c}={v}" for c, v in h.extra.items())
        lines.append(f"  {h.rank}. {h.score:.4f}  {h.caption}  {where(h)}{extra}")
    return "\n".join(lines)


@dataclass
class SearchConfig:
    """Queries against one index dir."""
    queries: list[str] = opt(default_factory=list, positional=True, nargs="*", help="text queries")
    index: str = opt(os.path.join("demo", "index"), help="INDEX_DIR written by `clipforge index` (default: the one "
                                                          "`make demo` builds)")
    image: list[str] = opt(default_factory=list, action="append", metavar="FILE",
                           help="an image file to search with (repeat for more)")
    k: int = opt(5, help="results per query")
    columns: str = opt("", help="extra metadata columns to show, comma-separated (e.g. width,height)")
    filter: str = opt("", help="only images whose metadata satisfies this expression, e.g. "
                               "\"width >= 256 AND caption ILIKE '%dog%'\"")
    dedup: float | None = opt(None, help="drop a result whose cosine to a better one is at least this (e.g. 0.95)")
    json: bool = opt(False, help="print a JSON list instead of text")
    device: str = opt("cpu", help="torch device of the query encoders")
    nprobe: int | None = opt(None, help="override the tuned nprobe (IVF indexes)")
    shards_dir: str = opt("", help="where the shard tars are (default: the index's shards_dir)")
    checkpoint: str = opt("", help="the model checkpoint (default: the index's; its weights must match)")
    search: SearchOptions = section(SearchOptions)

    def __post_init__(self):
        require(self, "k", self.k >= 1, "must be >= 1")
        require(self, "queries", bool(self.queries or self.image), "or --image: give at least one query")
        require(self, "dedup", self.dedup is None or 0 < self.dedup <= 1, "must be in (0, 1]")


def run(cfg: SearchConfig) -> int:
    searcher = Searcher(cfg.index, device=cfg.device, shards_dir=cfg.shards_dir or None,
                        search_params={"nprobe": cfg.nprobe} if cfg.nprobe else None,
                        checkpoint=cfg.checkpoint or None, options=cfg.search)
    queries = [*cfg.queries, *(Path(p) for p in cfg.image)]
    labels = [*cfg.queries, *(f"image {p}" for p in cfg.image)]
    columns = [c.strip() for c in cfg.columns.split(",") if c.strip()]
    results = searcher.search(queries, k=cfg.k, columns=columns, filter=cfg.filter or None, dedup=cfg.dedup)
    for note in results.notes:
        print(f"note: {note}", file=sys.stderr)
    if cfg.json:
        print(json.dumps([{"query": q, "hits": [asdict(h) for h in hits]} for q, hits in zip(labels, results)],
                         ensure_ascii=False, indent=2, default=str))
    else:
        print("\n\n".join(format_hits(q, hits, searcher.image_path) for q, hits in zip(labels, results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    cli = CLI(SearchConfig, prog="python -m indexing.search", description="Text / image search in an index dir.")
    return run_main(cli, argv, run, (SearchError, OSError), prefix="indexing.search")


if __name__ == "__main__":
    raise SystemExit(main())
