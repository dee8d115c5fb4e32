"""Text-to-image search over an index written by indexing.build.

    python -m indexing.search "a red apple" ["query 2" ...] --index INDEX_DIR [--k 5] [--json]

    from indexing.search import Searcher
    s = Searcher("runs/index")
    hits = s.search(["a red apple"], k=5)[0]      # list[Hit], score (cosine) descending
    jpg = s.image_bytes(hits[0])                  # original jpg bytes, read from the shard tar by offset/size

The faiss index is memory-mapped where the index type allows it, metadata.parquet is read memory-mapped with
pyarrow, and the search parameters (nprobe / efSearch) tuned at build time are applied on load.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexing.build import encode_texts
from trainer.clip.flags import CLI, opt, require, run_main
from trainer.clip.formats.index import INDEX_FILE, META_FILE, IndexFormatError, read_index_info


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
    offset: int = 0     # byte offset of the jpg data in the tar
    size: int = 0       # jpg size in bytes


class SearchError(RuntimeError):
    """A user-facing error (missing or malformed index dir)."""


def read_index(path: Path, mmap: bool = True) -> faiss.Index:
    """Read a faiss index, memory-mapped (zero-copy for flat codes) when this faiss build and index type allow."""
    flags = []
    if mmap:
        ro = getattr(faiss, "IO_FLAG_READ_ONLY", 0)
        flags += [getattr(faiss, f) | ro for f in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP") if hasattr(faiss, f)]
    for flag in flags:
        try:
            return faiss.read_index(str(path), flag)
        except RuntimeError:
            continue
    return faiss.read_index(str(path))


class Searcher:
    def __init__(self, index_dir: str | Path, device: str = "cpu", shards_dir: str | Path | None = None,
                 search_params: dict | None = None, mmap: bool = True):
        self.index_dir = Path(index_dir)
        try:
            self.info = read_index_info(self.index_dir)
        except IndexFormatError as e:
            raise SearchError(str(e)) from e
        self.shards_dir = Path(shards_dir) if shards_dir else Path(self.info["shards_dir"])
        self.device = device

        self.index = read_index(self.index_dir / INDEX_FILE, mmap=mmap)
        self.meta = pq.read_table(self.index_dir / META_FILE, memory_map=True)
        if self.index.ntotal != self.meta.num_rows:
            raise SearchError(f"{self.index_dir}: index has {self.index.ntotal} vectors but metadata has "
                              f"{self.meta.num_rows} rows")
        self.search_params = {**self.info.get("search_params", {}), **(search_params or {})}
        ps = faiss.ParameterSpace()
        for name, value in list(self.search_params.items()):
            try:
                ps.set_index_parameter(self.index, name, value)
            except RuntimeError:  # e.g. nprobe on a Flat index: not applicable, ignore
                print(f"warning: search parameter {name}={value} does not apply to this index", file=sys.stderr)
                del self.search_params[name]

        from trainer.clip.checkpoint import load_pretrained  # public trainer API only

        self.model, _, self.tokenizer = load_pretrained(self.info["checkpoint"], device=device)
        self.model.eval()

    @property
    def num_vectors(self) -> int:
        return int(self.index.ntotal)

    def encode(self, queries: list[str]) -> np.ndarray:
        """list[str] -> float32[Q, D] L2-normalised text embeddings."""
        return encode_texts(self.model, self.tokenizer, list(queries), self.device)

    def search(self, queries: list[str], k: int = 5) -> list[list[Hit]]:
        """-> one list of up to k Hits per query, score descending (k is capped at num_vectors)."""
        if isinstance(queries, str):
            queries = [queries]
        k = max(0, min(int(k), self.num_vectors))
        if not queries or k == 0:
            return [[] for _ in queries]
        xq = self.encode(queries)                                          # [Q, D]
        scores, ids = self.index.search(xq, k)                             # [Q, k], [Q, k]; id -1 = no result
        flat = np.unique(ids[ids >= 0])
        rows = dict(zip(flat.tolist(), self.meta.take(pa.array(flat, pa.int64())).to_pylist()))
        out = []
        for q_scores, q_ids in zip(scores, ids):
            order = np.argsort(-q_scores, kind="stable")                 # faiss sorts already; be explicit
            hits = []
            for j in order:
                i = int(q_ids[j])
                if i < 0:
                    continue
                r = rows[i]
                hits.append(Hit(rank=len(hits) + 1, score=float(q_scores[j]), key=r["key"], caption=r["caption"],
                                url=r["url"], image=f"{r['shard']}#{r.get('member') or r['key'] + '.jpg'}", id=i,
                                shard=r["shard"], offset=int(r["offset"]), size=int(r["size"])))
            out.append(hits)
        return out

    def image_path(self, hit: Hit) -> str:
        """Where the image lives: SHARDS_DIR/shard-00000.tar#KEY.jpg."""
        return f"{self.shards_dir / hit.shard}#{hit.image.split('#', 1)[1]}"

    def image_bytes(self, hit: Hit) -> bytes:
        """Original jpg bytes of a hit, read straight from the shard tar (one seek + read)."""
        with open(self.shards_dir / hit.shard, "rb") as f:
            f.seek(hit.offset)
            data = f.read(hit.size)
        if len(data) != hit.size:
            raise OSError(f"short read from {self.shards_dir / hit.shard} at {hit.offset}: {len(data)}/{hit.size} bytes")
        return data


def format_hits(query: str, hits: list[Hit], where=lambda h: h.image) -> str:
    lines = [f"query: {query}"]
    for h in hits:
        lines.append(f"  {h.rank}. {h.score:.4f}  {h.caption}  {where(h)}")
    return "\n".join(lines)


@dataclass
class SearchConfig:
    """Queries against one index dir."""
    queries: list[str] = opt(default_factory=list, positional=True, help="one or more text queries")
    index: str = opt(os.path.join("demo", "index"), help="INDEX_DIR written by indexing.build (default: the one "
                                                          "`make demo` builds)")
    k: int = opt(5, help="results per query")
    json: bool = opt(False, help="print a JSON list instead of text")
    device: str = opt("cpu", help="torch device of the text tower")
    nprobe: int | None = opt(None, help="override the tuned nprobe (IVF indexes)")

    def __post_init__(self):
        require(self, "k", self.k >= 1, "must be >= 1")


def run(cfg: SearchConfig) -> int:
    searcher = Searcher(cfg.index, device=cfg.device, search_params={"nprobe": cfg.nprobe} if cfg.nprobe else None)
    results = searcher.search(cfg.queries, k=cfg.k)
    if cfg.json:
        print(json.dumps([{"query": q, "hits": [asdict(h) for h in hits]} for q, hits in zip(cfg.queries, results)],
                         ensure_ascii=False, indent=2))
    else:
        print("\n\n".join(format_hits(q, hits, searcher.image_path) for q, hits in zip(cfg.queries, results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    cli = CLI(SearchConfig, prog="python -m indexing.search", description="Text-to-image search.")
    return run_main(cli, argv, run, (SearchError, FileNotFoundError, OSError), prefix="indexing.search")


if __name__ == "__main__":
    raise SystemExit(main())
