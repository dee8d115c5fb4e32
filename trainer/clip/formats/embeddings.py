"""The embedding dir contract: what `clipforge embed` writes and `clipforge index` reads.

One part per input shard tar, part id = the shard's position in the shard dir's listing (manifest order):

    EMBED_DIR/emb/img-XXXXX.npy     [rows of the part, D] L2-normalised image embeddings, float16 or float32
    EMBED_DIR/emb/txt-XXXXX.npy     [rows of the part, D] the captions' text embeddings, same dtype
                                    row i of both = row i of the part's meta parquet; a zero row where the image
                                    did not decode (`embedded` false)
    EMBED_DIR/meta/XXXXX.parquet    one row per sample of the tar, in tar order: EMBED_META_SCHEMA (key, shard,
                                    member, offset, size, caption, url, embedded) then every column of the shard's
                                    sidecar parquet (width, height, sha256, language, clip_score, carried columns).
                                    Written last, atomically: the part's completion marker. Its schema metadata
                                    (`part_info`) records weights_sha256, dim, dtype, rows, embedded and the input
                                    fingerprint the writer uses to decide reuse.
    EMBED_DIR/embed.json            {"format": EMBED_FORMAT, "checkpoint", "weights_sha256", "dim", "dtype",
                                     "shards_dir", "num_rows", "num_embedded",
                                     "parts": [{"id", "shard", "rows", "embedded"}], "failed": {id: cause}}:
                                    written last; readers trust only the parts it lists.

`shard` is the tar path relative to shards_dir; offset / size locate the image bytes inside that tar (one seek +
read). No torch, faiss or ray here: numpy and pyarrow only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from trainer.clip.formats.atomic import atomic_open, atomic_write, atomic_write_json, read_format_json

EMBED_FORMAT = "clipforge.embed.v1"
EMBED_MANIFEST, EMB_SUBDIR, META_SUBDIR = "embed.json", "emb", "meta"
EMBED_DTYPES = ("float16", "float32")
PART_INFO_KEY = b"part_info"
EMBED_META_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("member", pa.string()),
    ("offset", pa.int64()), ("size", pa.int64()),
    ("caption", pa.string()), ("url", pa.string()),
    ("embedded", pa.bool_()),  # false: the image did not decode; its embedding rows are zero, never indexed
])
EMBED_META_COLUMNS = tuple(EMBED_META_SCHEMA.names)


class EmbedFormatError(ValueError):
    """An embedding dir (or one of its parts) is missing, unreadable or inconsistent."""


def part_paths(embed_dir: str | Path, part_id: int) -> tuple[Path, Path, Path]:
    """(image npy, text npy, meta parquet) of part `part_id`."""
    root = Path(embed_dir)
    return (root / EMB_SUBDIR / f"img-{part_id:05d}.npy", root / EMB_SUBDIR / f"txt-{part_id:05d}.npy",
            root / META_SUBDIR / f"{part_id:05d}.parquet")


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """One embedding matrix, atomically."""
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array))


def write_part_meta(path: str | Path, table: pa.Table, part_info: dict) -> None:
    """The part's meta parquet (the completion marker, so write the npy files first): `table` must hold
    EMBED_META_SCHEMA's columns (cast to it, first) and may hold more (kept after them)."""
    import pyarrow.parquet as pq

    own = table.select(list(EMBED_META_COLUMNS)).cast(EMBED_META_SCHEMA)
    extra = [c for c in table.column_names if c not in EMBED_META_COLUMNS]
    schema = pa.schema([*EMBED_META_SCHEMA, *(table.schema.field(c) for c in extra)])
    schema = schema.with_metadata({PART_INFO_KEY: json.dumps(part_info, sort_keys=True).encode()})
    out = pa.Table.from_arrays([*own.columns, *(table.column(c) for c in extra)], schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(out, tmp, row_group_size=64_000))


def read_part_info(path: str | Path) -> dict | None:
    """The part_info a meta parquet was written with; None when the file is missing or unreadable."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[PART_INFO_KEY].decode())
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def write_embed_manifest(embed_dir: str | Path, manifest: dict) -> dict:
    manifest = {"format": EMBED_FORMAT, **manifest}
    atomic_write_json(Path(embed_dir) / EMBED_MANIFEST, manifest)
    return manifest


def read_embed_manifest(embed_dir: str | Path) -> dict:
    return read_format_json(Path(embed_dir) / EMBED_MANIFEST, EMBED_FORMAT, EmbedFormatError,
                            "run `clipforge embed` first", "re-run `clipforge embed`")


@dataclass(frozen=True)
class EmbedPart:
    id: int
    shard: str  # tar path relative to the manifest's shards_dir
    rows: int
    embedded: int
    img: Path
    txt: Path
    meta: Path

    def load(self, which: str = "img", mmap: bool = True) -> np.ndarray:
        """The part's image ("img") or text ("txt") embeddings [rows, D], memory-mapped; checked against rows."""
        path = self.img if which == "img" else self.txt
        try:
            a = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as e:
            raise EmbedFormatError(f"cannot read {path}: {e}") from e
        if a.ndim != 2 or a.shape[0] != self.rows or a.dtype.name not in EMBED_DTYPES:
            raise EmbedFormatError(f"{path}: shape {a.shape} dtype {a.dtype}, expected ({self.rows}, D) "
                                   f"of {' or '.join(EMBED_DTYPES)}")
        return a

    def embedded_mask(self) -> np.ndarray:
        """bool[rows]: which rows hold an embedding (the meta parquet's `embedded` column)."""
        import pyarrow.parquet as pq

        col = pq.read_table(self.meta, columns=["embedded"]).column("embedded")
        mask = col.to_numpy(zero_copy_only=False).astype(bool)
        if len(mask) != self.rows:
            raise EmbedFormatError(f"{self.meta}: {len(mask)} rows, the manifest says {self.rows}")
        return mask


def embed_parts(embed_dir: str | Path, manifest: dict | None = None) -> Iterator[EmbedPart]:
    """The parts the manifest lists, in part order."""
    m = manifest or read_embed_manifest(embed_dir)
    for p in sorted(m["parts"], key=lambda p: int(p["id"])):
        img, txt, meta = part_paths(embed_dir, int(p["id"]))
        yield EmbedPart(int(p["id"]), str(p["shard"]), int(p["rows"]), int(p["embedded"]), img, txt, meta)
