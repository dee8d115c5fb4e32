"""A v2 index dir (trainer.clip.formats.index) for the search, service and web page tests.

    make_index_dir(root, shards_dir, ckpt_dir, factory="Flat") -> root

encodes every decodable image of the shard dir's tars (tar order) with the checkpoint's model and writes ROOT as a
committed build: image.index (faiss.index_factory(D, factory, inner product), trained on the vectors themselves
where the type needs training), metadata.parquet (METADATA_SCHEMA's columns, then the image's width and height),
report.json, index.json. Search parameters make an approximate index search exhaustively (IVF: nprobe = nlist;
HNSW: efSearch >= N), so every test can compare with exact search. A second call on the same ROOT commits a new
build (the formats module keeps the previous one). This stands in for `clipforge embed` + `clipforge index` so the
search side can be tested on its own; it will be re-implemented on top of them with the same signature.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from trainer.clip.checkpoint import load_pretrained, weights_sha256
from trainer.clip.encode import encode_image_batch
from trainer.clip.formats.atomic import atomic_write
from trainer.clip.formats.index import (INDEX_FILE, META_FILE, REPORT_FILE, build_dir, commit_build, new_build_id,
                                        write_metadata, write_report)
from trainer.clip.formats.shards import image_ext, iter_tar_samples, list_shards

BATCH = 32


def _samples(shards_dir: Path):
    """(metadata row, RGB image) of every sample whose image decodes, in shard then tar order."""
    root = shards_dir.resolve()
    for shard in list_shards(shards_dir).present:
        for s in iter_tar_samples(shard.tar):
            ext = image_ext(s.members)
            if ext is None:
                continue
            m = s.members[ext]
            try:
                with Image.open(io.BytesIO(m.data)) as img:
                    img.load()
                    rgb = img.convert("RGB")
            except Exception:  # noqa: BLE001 -- an undecodable image is not indexed
                continue
            meta = json.loads(s.members["json"].data) if "json" in s.members else {}
            caption = s.members["txt"].data.decode() if "txt" in s.members else meta.get("caption", "")
            yield {"key": s.key, "caption": caption, "url": meta.get("url"), "shard": shard.tar.relative_to(root)
                   .as_posix(), "member": m.name, "offset": m.offset, "size": m.size, "width": rgb.width,
                   "height": rgb.height}, rgb


def _embed(model, preprocess, shards_dir: Path) -> tuple[list[dict], np.ndarray]:
    rows, chunks, batch = [], [], []
    for row, img in _samples(shards_dir):
        rows.append(row)
        batch.append(preprocess(img))
        if len(batch) == BATCH:
            chunks.append(encode_image_batch(model, torch.stack(batch)))
            batch = []
    if batch:
        chunks.append(encode_image_batch(model, torch.stack(batch)))
    return rows, np.concatenate(chunks).astype(np.float32)


def _exhaustive_params(index, n: int) -> dict:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params = {"nprobe": int(ivf.nlist)}
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            params["quantizer_efSearch"] = max(64, int(ivf.nlist))
        return params
    return {"efSearch": max(64, n)} if isinstance(faiss.downcast_index(index), faiss.IndexHNSW) else {}


def make_index_dir(root, shards_dir, ckpt_dir, factory: str = "Flat") -> Path:
    root, shards_dir = Path(root), Path(shards_dir)
    model, preprocess, _ = load_pretrained(ckpt_dir)
    model.eval()
    rows, x = _embed(model, preprocess, shards_dir)
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    params = _exhaustive_params(index, len(x))
    sha, bid = weights_sha256(ckpt_dir), new_build_id()
    folder = build_dir(root, bid)
    folder.mkdir(parents=True)
    atomic_write(folder / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    write_metadata(folder / META_FILE, pa.Table.from_pylist(rows), bid, sha)
    write_report(folder / REPORT_FILE, {"factory": factory, "reasons": ["test fixture (tests/index_data.py)"],
                                        "search_params": params}, bid, sha)
    commit_build(root, bid, {"weights_sha256": sha, "checkpoint": str(Path(ckpt_dir).resolve()), "embeddings": None,
                             "shards_dir": str(shards_dir.resolve()), "dim": int(x.shape[1]), "num_vectors": len(x),
                             "factory": factory, "metric": "inner_product", "search_params": params})
    return root
