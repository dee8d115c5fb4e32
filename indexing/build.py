"""Build a FAISS text-to-image index from clipforge shards.

    python -m indexing.build --shards SHARDS_DIR --checkpoint CKPT_DIR --out INDEX_DIR \
        [--batch-size 64] [--factory auto] [--device cpu]

Pipeline: shard tars (read with tarfile, so every jpg member's data offset/size is recorded for random
access) -> PIL decode + eval preprocess -> CLIP image tower (inference_mode) -> L2-normalised float32
vectors -> FAISS inner-product index -> search parameters (nprobe / efSearch) tuned on *text* queries
(captions from the data) against exact search, so the index meets a recall target rather than a latency guess.

Writes INDEX_DIR/{image.index, metadata.parquet, index.json} (the contract: trainer.clip.formats.index), each file
atomically, index.json last (the commit marker); a rebuild replaces all three. Corrupt samples are skipped and counted.
"""
from __future__ import annotations

import io
import json
import math
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from trainer.clip.flags import CLI, opt, require, run_main
from trainer.clip.formats.index import INDEX_FORMAT, METADATA_SCHEMA, write_index_dir
from trainer.clip.formats.shards import ShardFormatError, TarSample, iter_tar_samples, list_shards



@dataclass
class IndexConfig:
    """What is indexed, with which model, and the FAISS index built."""
    shards: str = opt("", required=True, help="SHARDS_DIR (manifest.json + shard tars, or plain *.tar)")
    checkpoint: str = opt("", required=True, help="CKPT_DIR (model.safetensors + config.json) or an OpenAI / "
                                                  "open_clip / HF checkpoint")
    out: str = opt("", required=True, help="INDEX_DIR to write")
    batch_size: int = opt(64, help="images per forward pass")
    factory: str = opt("auto", help='"auto" or any faiss index_factory string ("Flat", "IVF256,Flat", "HNSW32", ...)')
    device: str = opt("cpu", help="torch device of the image tower")
    workers: int = opt(2, help="decode / preprocess threads (PIL releases the GIL while decoding)")
    flat_below: int = opt(50_000, help="auto: an exact IndexFlatIP below this many vectors, else IVF")
    train_per_list: int = opt(64, help="IVF training sample = min(N, train-per-list * K) random vectors")
    target_recall: float = opt(0.95, help="tune nprobe / efSearch until text-query recall@10 vs exact reaches this")
    tune_queries: int = opt(256, help="captions used as tuning queries")
    seed: int = opt(0, help="the seed of the tuning-query and IVF-training samples")

    def __post_init__(self):
        for name in ("batch_size", "train_per_list"):
            require(self, name, getattr(self, name) >= 1, "must be >= 1")
        require(self, "workers", self.workers >= 0, "must be >= 0")
        require(self, "target_recall", 0 < self.target_recall <= 1, "must be in (0, 1]")

    @classmethod
    def tiny(cls, **kw) -> "IndexConfig":
        """CPU-test preset: small batches, one worker, few tuning queries."""
        return cls(**{"batch_size": 8, "workers": 1, "tune_queries": 32, **kw})


class BuildError(RuntimeError):
    """A user-facing error (bad paths, empty data): printed by main() without a traceback."""


# ----------------------------------------------------------------------------- reading shards

@dataclass
class Sample:
    key: str
    caption: str
    url: str
    shard: str          # tar path relative to SHARDS_DIR
    member: str         # jpg member name inside the tar, e.g. "000000012.jpg"
    offset: int         # byte offset of the jpg data in the tar file
    size: int           # jpg size in bytes
    jpg: bytes


def list_tars(shards_dir: Path) -> list[tuple[str, int | None]]:
    """(tar path relative to shards_dir, expected sample count or None) of every shard (see
    trainer.clip.formats.shards), missing tars included: their samples are counted as skipped."""
    if not shards_dir.is_dir():
        raise BuildError(f"shards dir not found: {shards_dir} (--shards)")
    try:
        d = list_shards(shards_dir)
    except ShardFormatError as e:
        raise BuildError(str(e)) from e
    if not d.present:
        raise BuildError(f"no shard tars found in {shards_dir} (expected manifest.json or *.tar)")
    return [(d.relative(s), s.num_samples) for s in d.shards]


def _make_sample(rel: str, sample: TarSample) -> Sample | None:
    """One tar sample -> Sample, or None when it has no jpg."""
    jpg = sample.members.get("jpg")
    if jpg is None:
        return None
    meta = {}
    if "json" in sample.members:
        try:
            meta = json.loads(sample.members["json"].data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            meta = {}
    meta = meta if isinstance(meta, dict) else {}
    txt = sample.members.get("txt")
    caption = txt.data.decode("utf-8", "replace").strip() if txt is not None else str(meta.get("caption", ""))
    return Sample(key=str(meta.get("key", sample.key.rpartition("/")[2])), caption=caption,
                  url=str(meta.get("url", "")), shard=rel, member=jpg.name, offset=jpg.offset, size=jpg.size,
                  jpg=jpg.data)


def iter_samples(shards_dir: Path, tars: list[tuple[str, int | None]], stats: dict) -> Iterator[Sample]:
    """Stream samples in tar order. Samples without a jpg count as skipped; so does what a missing / truncated /
    corrupt tar leaves unread (its manifest num_samples minus those read, at least the damaged one)."""
    for rel, expected in tars:
        done = 0  # samples of this tar already handed on or counted
        try:
            for tar_sample in iter_tar_samples(shards_dir / rel):
                sample, done = _make_sample(rel, tar_sample), done + 1
                if sample is None:
                    stats["skipped"] += 1
                else:
                    yield sample
        except (tarfile.TarError, OSError, EOFError) as e:
            lost = max(expected or 0, done + 1) - done
            print(f"warning: shard {rel} is missing, corrupt or truncated ({e}); skipping its {lost} unread samples",
                  file=sys.stderr)
            stats["skipped"] += lost


def decode(sample: Sample, preprocess) -> torch.Tensor | None:
    """jpg bytes -> FloatTensor[3,S,S], or None if the image is corrupt."""
    try:
        with Image.open(io.BytesIO(sample.jpg)) as img:
            img.load()  # force a full decode so truncated files fail here
            return preprocess(img.convert("RGB"))
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return None


# ----------------------------------------------------------------------------- encoding

def batched(it: Iterator[Sample], n: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_shards(cfg: IndexConfig, model, preprocess, tars: list[tuple[str, int | None]]) -> tuple[np.ndarray, list[Sample], int]:
    """-> (embeddings float32[N, D] L2-normalised, kept samples (jpg bytes dropped), skipped count)."""
    stats, chunks, kept, t0 = {"skipped": 0}, [], [], time.time()
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool, torch.inference_mode():
        for batch in batched(iter_samples(Path(cfg.shards), tars, stats), cfg.batch_size):
            tensors = list(pool.map(lambda s: decode(s, preprocess), batch))
            ok = [(s, t) for s, t in zip(batch, tensors) if t is not None]
            stats["skipped"] += len(batch) - len(ok)
            if not ok:
                continue
            images = torch.stack([t for _, t in ok]).to(cfg.device)       # [B, 3, S, S]
            feats = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)  # [B, D]
            chunks.append(feats.cpu().numpy().astype(np.float32, copy=False))
            for s, _ in ok:
                s.jpg = b""  # only the offset/size is kept; the index never holds image bytes
                kept.append(s)
            if len(chunks) % 50 == 0:
                print(f"encoded {len(kept)} images ({len(kept) / (time.time() - t0):.1f} img/s)", file=sys.stderr)
    if not kept:
        raise BuildError(f"no decodable images in {cfg.shards} (skipped {stats['skipped']})")
    return np.ascontiguousarray(np.concatenate(chunks)), kept, stats["skipped"]


def encode_texts(model, tokenizer, texts: list[str], device: str, batch_size: int = 256) -> np.ndarray:
    """list[str] -> float32[Q, D] L2-normalised text embeddings."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[i:i + batch_size]).to(device)         # [b, ctx]
            feats = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
            out.append(feats.cpu().numpy().astype(np.float32, copy=False))
    return np.ascontiguousarray(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------- faiss

def resolve_factory(factory: str, n: int, flat_below: int) -> str:
    """'auto' -> exact Flat for small N, else IVF with K ~ 4*sqrt(N) lists (HNSW coarse quantizer for huge K)."""
    if factory != "auto":
        return factory
    if n < flat_below:
        return "Flat"
    k = max(1, int(round(4 * math.sqrt(n))))
    return f"IVF{k}_HNSW32,Flat" if k >= 16384 else f"IVF{k},Flat"


def new_index(d: int, factory: str) -> faiss.Index:
    """Empty inner-product index from a factory string; BuildError (not a C++ trace) when the string is invalid."""
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1]  # drop faiss's "Error in <C++ signature>" prefix
        raise BuildError(f"invalid faiss factory string {factory!r}: {reason}") from e


def build_index(x: np.ndarray, factory: str, cfg: IndexConfig) -> faiss.Index:
    """x: float32[N, D] normalised -> trained, filled inner-product index."""
    n, d = x.shape
    index = new_index(d, factory)
    if not index.is_trained:
        ivf = _ivf(index)
        nlist = ivf.nlist if ivf is not None else 1
        if n < nlist:
            raise BuildError(f"factory {factory!r} needs at least {nlist} vectors to train, got {n}")
        m = min(n, max(cfg.train_per_list * nlist, 10_000))
        rng = np.random.default_rng(cfg.seed)
        sample = x[np.sort(rng.choice(n, size=m, replace=False))]         # random, not the first m
        print(f"training {factory} on {m} random vectors", file=sys.stderr)
        index.train(sample)
    index.add(x)
    return index


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def recall_at(index: faiss.Index, xq: np.ndarray, truth: np.ndarray, k: int) -> float:
    _, ids = index.search(xq, k)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth)]))


def tune_search(index: faiss.Index, x: np.ndarray, xq: np.ndarray, target: float) -> tuple[dict, float]:
    """Smallest nprobe (IVF) / efSearch (HNSW) whose recall@10 on text queries vs exact search reaches target.
    x: float32[N, D] database, xq: float32[Q, D] text queries. -> (search params, recall@10)."""
    k = min(10, x.shape[0])
    if len(xq) == 0:
        return {}, float("nan")
    _, truth = faiss.knn(xq, x, k, metric=faiss.METRIC_INNER_PRODUCT)  # exact ground truth [Q, k]
    ps = faiss.ParameterSpace()
    ivf = _ivf(index)
    if ivf is not None:
        name, grid = "nprobe", sorted({min(ivf.nlist, 2 ** i) for i in range(20)})
    elif hasattr(faiss.downcast_index(index), "hnsw"):
        name, grid = "efSearch", [16, 32, 64, 128, 256, 512, 1024]
    else:
        return {}, recall_at(index, xq, truth, k)
    for v in grid:  # recall grows with the parameter: stop at the first value that reaches the target
        ps.set_index_parameter(index, name, v)
        r = recall_at(index, xq, truth, k)
        if r >= target:
            break
    return {name: int(v)}, r


# ----------------------------------------------------------------------------- writing

def write_outputs(out: Path, index: faiss.Index, samples: list[Sample], info: dict) -> None:
    """The index dir (trainer.clip.formats.index): image.index, metadata.parquet, then index.json."""
    table = pa.table({name: [getattr(s, name) for s in samples] for name in METADATA_SCHEMA.names},
                     schema=METADATA_SCHEMA)
    write_index_dir(out, lambda tmp: faiss.write_index(index, tmp), table, info)


# ----------------------------------------------------------------------------- main

def build(cfg: IndexConfig) -> dict:
    """Run the whole stage; returns the index.json dict."""
    t0 = time.time()
    shards_dir, ckpt = Path(cfg.shards).resolve(), Path(cfg.checkpoint).resolve()
    tars = list_tars(shards_dir)
    if not ckpt.exists():  # a clipforge dir, or an OpenAI / open_clip / Hugging Face weights file or folder
        raise BuildError(f"checkpoint not found: {ckpt}")
    from trainer.clip.checkpoint import load_pretrained  # public trainer API only

    torch.manual_seed(cfg.seed)
    try:
        model, preprocess, tokenizer = load_pretrained(ckpt, device=cfg.device)
    except ValueError as e:  # trainer's CheckpointError (missing/corrupt weights, config mismatch)
        raise BuildError(f"cannot load checkpoint {ckpt}: {e}") from e
    model.eval()
    if cfg.factory != "auto":
        new_index(model.config.embed_dim, cfg.factory)  # fail fast, before encoding everything

    x, samples, skipped = encode_shards(cfg, model, preprocess, tars)  # x: [N, D]
    n, d = x.shape
    factory = resolve_factory(cfg.factory, n, cfg.flat_below)
    index = build_index(x, factory, cfg)

    # tuning queries: distinct captions from the data, a random subset
    rng = np.random.default_rng(cfg.seed)
    captions = sorted({s.caption for s in samples if s.caption})
    picks = [captions[i] for i in rng.permutation(len(captions))[: cfg.tune_queries]]
    xq = encode_texts(model, tokenizer, picks, cfg.device) if picks else np.zeros((0, d), np.float32)
    params, recall = tune_search(index, x, xq, cfg.target_recall)

    info = {
        "format": INDEX_FORMAT,
        "checkpoint": str(ckpt),
        "shards_dir": str(shards_dir),
        "dim": int(d),
        "num_vectors": int(index.ntotal),
        "factory": factory,
        "metric": "inner_product",
        "skipped": int(skipped),
        "search_params": params,
        "tuned_recall_at_10": None if math.isnan(recall) else round(recall, 4),
        "tune_queries": len(picks),
        "num_shards": len(tars),
        "build_seconds": round(time.time() - t0, 2),
        "config": asdict(cfg),
    }
    write_outputs(Path(cfg.out), index, samples, info)
    return info


def report(info: dict, out: str) -> int:
    print(f"indexed {info['num_vectors']} images (skipped {info['skipped']}) with {info['factory']} "
          f"{info['search_params']} recall@10={info['tuned_recall_at_10']} in {info['build_seconds']}s -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cli = CLI(IndexConfig, prog="python -m indexing.build", description=__doc__.split("\n\n")[0],
              presets={"default": IndexConfig, "tiny": IndexConfig.tiny})
    # OSError: e.g. --out is a file or not writable
    return run_main(cli, argv, lambda cfg: report(build(cfg), cfg.out), (BuildError, OSError), prefix="indexing.build")


if __name__ == "__main__":
    raise SystemExit(main())
