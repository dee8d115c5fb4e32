"""One part of `clipforge embed`: one shard tar -> its embeddings and meta parquet (the EMBED_DIR contract,
trainer.clip.formats.embeddings). Used by indexing.embed, in the driver's process (--executor local) or in a Ray
actor (one model per actor).

Reads  the shard tar: its members' headers, the bytes of the json / txt members, and each image by one pread at
       its offset / size (no second tar parse); the shard's sidecar parquet (SAMPLE_SCHEMA + carried columns),
       joined by key, when the shard has one; with filter reuse, this part's rows of the run's lookup
       (key -> ledger part, part_row) and the filter's emb/img|txt-NNNNN.npy rows they point at (memory-mapped).
Writes EMBED_DIR/emb/img-XXXXX.npy and txt-XXXXX.npy, then EMBED_DIR/meta/XXXXX.parquet (the part's completion
       marker), each atomically; the old meta parquet is deleted before anything else is written.

Rows are the tar's samples in tar order. A sample without an image member, or whose image does not decode, is a
row with `embedded` false and zero embedding rows (counted as no_image / decode_failed). A missing, truncated or
corrupt tar (or an unreadable sidecar) is a failed part, returned as {"failed": cause}: never an exception, never
partial files. Filter rows whose vectors are zero (never scored), of another dimension, or whose npy file is
unreadable are encoded instead.

Rerun: a part whose meta parquet's part_info matches (weights_sha256, dtype, captions setting, input fingerprint =
the tar's path + size and its sidecar's size) and whose npy files have (rows, dim) of that dtype is skipped
without loading the model; anything else is recomputed.
"""
from __future__ import annotations

import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykit.actors import failure_cause
from trainer.clip.encode import LazyEncoder
from trainer.clip.formats.embeddings import (EMBED_META_COLUMNS, part_paths, read_part_info, write_npy,
                                             write_part_meta)
from trainer.clip.formats.ledger import embedding_paths
from trainer.clip.formats.shards import image_ext, iter_tar_samples

INPUT_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, KeyError, pa.ArrowException)
TEXT_EXTS = ("json", "txt")
MATCH_KEYS = ("weights_sha256", "dtype", "captions", "input")  # part_info entries that must match for a skip


@dataclass(frozen=True)
class PartJob:
    id: int  # the shard's position in the shard dir's listing
    tar: str  # absolute path
    shard: str  # the tar's path relative to SHARDS_DIR
    sidecar: str = ""  # absolute path of the shard's sidecar parquet ("": none)
    lookup: str = ""  # dir of this part's reuse lookup parquet ("": no filter reuse for this part)


@dataclass(frozen=True)
class PartSettings:
    """What every part of a run shares (the actors' constructor argument)."""
    checkpoint: str  # absolute
    weights_sha256: str
    dtype: str = "float16"
    batch_size: int = 256
    captions: bool = True  # False: txt rows are zero
    filter_dir: str = ""  # the filter dir the lookups point into ("": no reuse)
    reuse_dim: int = 0  # the filter embeddings' dimension


def input_fingerprint(job: PartJob) -> dict:
    """What a part's result depends on besides the model: the tar's path and size, the sidecar's size.
    FileNotFoundError when the tar is missing."""
    side = os.stat(job.sidecar).st_size if job.sidecar and os.path.exists(job.sidecar) else None
    return {"shard": job.shard, "tar_bytes": os.stat(job.tar).st_size, "sidecar_bytes": side}


def wanted(settings: PartSettings, job: PartJob) -> dict:
    return {"weights_sha256": settings.weights_sha256, "dtype": settings.dtype, "captions": settings.captions,
            "input": input_fingerprint(job)}


def part_done(embed_dir: str | Path, job: PartJob, want: dict) -> dict | None:
    """The part_info of a complete part made with `want`'s settings and input, else None."""
    img, txt, meta = part_paths(embed_dir, job.id)
    info = read_part_info(meta)
    if info is None or any(info.get(k) != v for k, v in want.items()):
        return None
    try:
        rows, dim = int(info["rows"]), int(info["dim"])
        if pq.read_metadata(meta).num_rows != rows:
            return None
        for path in (img, txt):
            a = np.load(path, mmap_mode="r")
            if a.shape != (rows, dim) or a.dtype != np.dtype(want["dtype"]):
                return None
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    return info


# ------------------------------------------------------------------------------------------------ the tar's rows
@dataclass
class PartRows:
    keys: list[str]
    members: list[str | None]  # the image member's name (None: no image member)
    offsets: np.ndarray  # int64, -1 without an image
    sizes: np.ndarray  # int64, -1 without an image
    captions: list[str | None]
    urls: list[str | None]
    fields: list[dict]  # each sample's json scalar fields (the meta columns when the shard has no sidecar)

    @property
    def n(self) -> int:
        return len(self.keys)


def _json(member) -> dict:
    if member is None or not member.data:
        return {}
    try:
        value = json.loads(member.data)
    except ValueError:  # a malformed json member: the sample keeps its stem as key and no metadata
        return {}
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def read_rows(tar: str) -> PartRows:
    """The tar's samples in tar order. Raises tarfile.TarError / OSError / EOFError for an unreadable tar."""
    keys, members, offsets, sizes, captions, urls, fields = [], [], [], [], [], [], []
    for s in iter_tar_samples(tar, read=lambda ext: ext in TEXT_EXTS):
        meta = _json(s.members.get("json"))
        ext = image_ext(s.members)
        image = s.members[ext] if ext else None
        txt = s.members.get("txt")
        keys.append(_text(meta.get("key")) or s.key)
        members.append(image.name if image else None)
        offsets.append(image.offset if image else -1)
        sizes.append(image.size if image else -1)
        captions.append(txt.data.decode("utf-8", "replace") if txt is not None else _text(meta.get("caption")))
        urls.append(_text(meta.get("url")))
        fields.append({k: v for k, v in meta.items() if k not in EMBED_META_COLUMNS
                       and (v is None or isinstance(v, (str, int, float, bool)))})
    return PartRows(keys, members, np.array(offsets, np.int64), np.array(sizes, np.int64), captions, urls, fields)


def _column(values: list) -> pa.Array:
    """A json field as one column: its inferred type, or strings when the samples disagree on it."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def json_columns(rows: PartRows) -> dict[str, pa.Array]:
    names = list(dict.fromkeys(k for f in rows.fields for k in f))
    return {k: _column([f.get(k) for f in rows.fields]) for k in names}


def sidecar_columns(path: str, keys: list[str]) -> dict[str, pa.Array]:
    """Every column of the sidecar parquet, rows taken by key (the first row of a key; nulls for a key it lacks).
    ValueError when it has no key column."""
    t = pq.read_table(path)
    if "key" not in t.column_names:
        raise ValueError(f"{path}: no key column")
    first: dict = {}
    for i, k in enumerate(t.column("key").to_pylist()):
        first.setdefault(k, i)
    t = t.take(pa.array([first.get(k) for k in keys], pa.int64()))
    return {c: t.column(c).combine_chunks() for c in t.column_names}


def meta_table(job: PartJob, rows: PartRows, embedded: np.ndarray, extra: dict[str, pa.Array]) -> pa.Table:
    """EMBED_META_SCHEMA's columns, then the sidecar's (or the json's) other columns; the caption and url fall
    back to the sidecar's when the sample's own members lack them."""
    no_image = rows.offsets < 0
    cols = {"key": pa.array(rows.keys, pa.string()), "shard": pa.array([job.shard] * rows.n, pa.string()),
            "member": pa.array(rows.members, pa.string()),
            "offset": pa.array(rows.offsets, pa.int64(), mask=no_image),
            "size": pa.array(rows.sizes, pa.int64(), mask=no_image),
            "caption": pa.array(rows.captions, pa.string()), "url": pa.array(rows.urls, pa.string()),
            "embedded": pa.array(embedded, pa.bool_())}
    for name in ("caption", "url"):
        if name in extra and pa.types.is_string(extra[name].type):
            cols[name] = pc.coalesce(cols[name], extra[name])
    cols.update({k: v for k, v in extra.items() if k not in EMBED_META_COLUMNS})
    return pa.table(cols)


# ------------------------------------------------------------------------------------------------ filter reuse
def reused_rows(settings: PartSettings, job: PartJob, rows: PartRows):
    """The rows whose embeddings the filter computed with these weights. -> (positions int64, img [k, D],
    txt [k, D]) float32, from the filter's npy files by the part's lookup (key -> ledger part, part_row)."""
    empty = np.zeros(0, np.int64), np.zeros((0, settings.reuse_dim), np.float32), None
    if not (job.lookup and settings.filter_dir and os.path.isdir(job.lookup)):
        return empty
    t = pq.read_table(job.lookup, columns=["key", "ledger_part", "part_row"])
    where = dict(zip(t.column("key").to_pylist(), zip(t.column("ledger_part").to_pylist(),
                                                      t.column("part_row").to_pylist())))
    by_part: dict[int, list[tuple[int, int]]] = {}
    for pos, key in enumerate(rows.keys):
        if rows.offsets[pos] >= 0 and key in where:
            lp, pr = where[key]
            by_part.setdefault(int(lp), []).append((pos, int(pr)))
    got = [_vectors(settings, lp, hits) for lp, hits in sorted(by_part.items())]
    got = [g for g in got if g is not None and len(g[0])]
    if not got:
        return empty
    return tuple(np.concatenate(parts) for parts in zip(*got))


def _vectors(settings: PartSettings, ledger_part: int, hits: list[tuple[int, int]]):
    """(positions, img, txt) of one ledger part's hits whose vectors exist and are non-zero, else None."""
    pos = np.array([h[0] for h in hits], np.int64)
    src = np.array([h[1] for h in hits], np.int64)
    try:
        img_a, txt_a = (np.load(p, mmap_mode="r") for p in embedding_paths(settings.filter_dir, ledger_part))
    except (OSError, ValueError):
        return None
    if img_a.ndim != 2 or img_a.shape != txt_a.shape or img_a.shape[1] != settings.reuse_dim:
        return None
    ok = (src >= 0) & (src < img_a.shape[0])
    pos, src = pos[ok], src[ok]
    order = np.argsort(src, kind="stable")  # ascending reads from the memory map
    pos, src = pos[order], src[order]
    img, txt = np.asarray(img_a[src], np.float32), np.asarray(txt_a[src], np.float32)
    scored = img.any(axis=1)  # a zero row: the filter did not score that row
    return pos[scored], img[scored], txt[scored]


# ------------------------------------------------------------------------------------------------ the worker
class PartEmbedder:
    """Embeds whole parts with one model, loaded on the first part that needs it (a Ray actor, or in-process)."""

    def __init__(self, settings: PartSettings, threads: int | None = 1, device: str = "cpu"):
        self.settings, self.device = settings, device
        self.model = LazyEncoder(settings.checkpoint, device, settings.batch_size, threads or 1,
                                 set_threads=bool(threads))

    def close(self) -> None:
        self.model.close()

    def embed(self, embed_dir: str, job: PartJob, attempt: int = 1) -> dict:
        """Embed (or skip) one part. -> {"id", "shard", "rows", "embedded", "reused", "encoded", "no_image",
        "decode_failed", "dim", "skipped", "seconds", "actor"}, or {"id", "shard", "failed": cause}."""
        t0 = time.monotonic()
        try:
            want = wanted(self.settings, job)
            info = part_done(embed_dir, job, want)
            if info is not None:
                return {**summary(job, info), "skipped": True, "seconds": time.monotonic() - t0}
            rows = read_rows(job.tar)
            extra = sidecar_columns(job.sidecar, rows.keys) if job.sidecar else json_columns(rows)
        except INPUT_ERRORS as e:  # the input is missing or broken: a failed part, not worth a retry
            return {"id": job.id, "shard": job.shard, "failed": failure_cause(e, attempt)}
        img_p, txt_p, meta_p = part_paths(embed_dir, job.id)
        meta_p.unlink(missing_ok=True)  # the old completion marker goes first
        img, txt, embedded, counts = self._embeddings(job, rows)
        write_npy(img_p, img)
        write_npy(txt_p, txt)
        info = {**want, "checkpoint": self.settings.checkpoint, "dim": int(img.shape[1]), "rows": rows.n,
                "embedded": int(embedded.sum()), **counts}
        write_part_meta(meta_p, meta_table(job, rows, embedded, extra), info)
        return {**summary(job, info), "skipped": False, "seconds": time.monotonic() - t0}

    def _embeddings(self, job: PartJob, rows: PartRows):
        """-> (img [n, D], txt [n, D] in the run's dtype, embedded bool [n], counts)."""
        s = self.settings
        pos, r_img, r_txt = reused_rows(s, job, rows)
        has_image = rows.offsets >= 0
        todo_mask = has_image.copy()
        todo_mask[pos] = False
        if todo_mask.any() or not len(pos):
            self.model.get()
            if len(pos) and self.model.dim != r_img.shape[1]:  # never with equal weights: encode all rather than mix
                pos, todo_mask = pos[:0], has_image.copy()
        dim = self.model.dim if self.model.loaded else int(r_img.shape[1])
        img, txt = np.zeros((rows.n, dim), s.dtype), np.zeros((rows.n, dim), s.dtype)
        embedded = np.zeros(rows.n, bool)
        if len(pos):
            img[pos], embedded[pos] = r_img, True
            if s.captions:
                txt[pos] = r_txt
        todo = np.flatnonzero(todo_mask)
        if len(todo):
            captions = [rows.captions[i] for i in todo]
            for idx, fi, ft in self.model.get().encode(job.tar, rows.offsets[todo], rows.sizes[todo], captions,
                                                   texts=s.captions):
                at = todo[idx]
                img[at], embedded[at] = fi, True
                if ft is not None:
                    txt[at] = ft
        encoded = int(embedded.sum()) - len(pos)
        counts = {"reused": int(len(pos)), "encoded": encoded, "no_image": int((~has_image).sum()),
                  "decode_failed": int(len(todo)) - encoded}
        return img, txt, embedded, counts


def summary(job: PartJob, info: dict) -> dict:
    """A part's result from its part_info (what the driver records in embed.json)."""
    out = {"id": job.id, "shard": job.shard, "actor": os.getpid()}
    for k in ("rows", "embedded", "reused", "encoded", "no_image", "decode_failed", "dim"):
        out[k] = int(info.get(k, 0))
    return out
