"""Index dirs for the search, service and web page tests, made by the real stages.

    add_sidecars(shards_dir) -> the rewritten manifest
    make_index_dir(root, shards_dir, ckpt_dir, factory="Flat") -> root
    exhaustive_params(index_dir) -> {faiss parameter: value}

add_sidecars gives a shard dir written by trainer.clip.formats.shards.write_shard_dir what `clipforge shard` writes
next to each tar: SHARDS_DIR/shard-XXXXX.parquet, one SAMPLE_SCHEMA row per sample in tar order (key and url from the
sample's json, caption from its txt else its json, width / height from the image's header, sha256 of the image
bytes; language and clip_score null; width / height / sha256 null without a readable image), then manifest.json
again with each shard's "parquet" (its other keys kept). A rerun rewrites the same files.

make_index_dir runs `clipforge embed` (indexing.embed, the tiny preset: in this process) on SHARDS_DIR with the
checkpoint into EMBED_DIR = ROOT's sibling ROOT.name + "-emb", then `clipforge index` (indexing.build, the tiny
preset) from EMBED_DIR into ROOT with the given faiss factory ("auto": the chooser), tuned to recall 1.0 on the
caption queries. So the metadata columns (width, height, ... of the sidecars) are what the embed stage carries, and
vector ids are the embedded rows in shard then tar order. A second call on the same ROOT reuses the embedded parts
(the embed stage skips them) and commits a new build (the formats module keeps the previous one). An embed part
that fails is an AssertionError here, not a silently smaller index.

exhaustive_params: the search parameters under which the current build of INDEX_DIR scans everything (IVF: nprobe
= nlist, an HNSW quantizer's efSearch >= nlist; HNSW: efSearch >= N; none for Flat / PQ), for a test that compares
an approximate index with exact search on a filtered set, where tuning on caption queries promises nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import faiss
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from indexing.build import IndexConfig, build
from indexing.embed import EmbedConfig, run
from indexing.faissio import read_index
from trainer.clip.formats.atomic import atomic_write
from trainer.clip.formats.index import open_index_set
from trainer.clip.formats.shards import SAMPLE_SCHEMA, TarSample, image_ext, iter_tar_samples, read_manifest, \
    write_manifest

MANIFEST_OWN_KEYS = ("format", "num_samples", "missing", "shards")  # what write_manifest writes itself


def _image_size(data: bytes | None) -> tuple[int | None, int | None]:
    if not data:
        return None, None
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: no decode
            return img.size
    except Exception:  # noqa: BLE001 -- not an image: the sidecar says so with nulls
        return None, None


def _sidecar_row(s: TarSample) -> dict:
    try:
        meta = json.loads(s.members["json"].data) if "json" in s.members else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    ext = image_ext(s.members)
    data = s.members[ext].data if ext else None
    width, height = _image_size(data)
    caption = s.members["txt"].data.decode() if "txt" in s.members else meta.get("caption")
    return {"key": meta.get("key") or s.key, "url": meta.get("url"), "caption": caption, "width": width,
            "height": height, "sha256": hashlib.sha256(data).hexdigest() if data else None, "language": None,
            "clip_score": None}


def add_sidecars(shards_dir) -> dict:
    root = Path(shards_dir)
    manifest = read_manifest(root)
    entries = []
    for entry in manifest["shards"]:
        tar = root / entry["tar"]
        table = pa.Table.from_pylist([_sidecar_row(s) for s in iter_tar_samples(tar)], schema=SAMPLE_SCHEMA)
        side = tar.with_suffix(".parquet")
        atomic_write(side, lambda tmp, t=table: pq.write_table(t, tmp))
        entries.append({**entry, "parquet": side.relative_to(root).as_posix()})
    extra = {k: v for k, v in manifest.items() if k not in MANIFEST_OWN_KEYS}
    return write_manifest(root, entries, **extra)


def make_index_dir(root, shards_dir, ckpt_dir, factory: str = "Flat") -> Path:
    root = Path(root)
    embed_dir = root.parent / f"{root.name}-emb"
    manifest = run(EmbedConfig.tiny(shards_dir, ckpt_dir, embed_dir))
    assert not manifest["failed"], f"clipforge embed failed on parts of {shards_dir}: {manifest['failed']}"
    build(IndexConfig.tiny(embeddings=str(embed_dir), out=str(root), factory=factory, target_recall=1.0,
                           device="cpu"))
    return root


def exhaustive_params(index_dir) -> dict:
    index_set = open_index_set(index_dir)
    index = read_index(index_set.index_path)
    n = int(index.ntotal)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params = {"nprobe": int(ivf.nlist)}
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            params["quantizer_efSearch"] = max(64, int(ivf.nlist))
        return params
    return {"efSearch": max(64, n)} if isinstance(faiss.downcast_index(index), faiss.IndexHNSW) else {}
