"""The index dir contract: what `clipforge index` writes and `clipforge search` reads.

    INDEX_DIR/image.index       a FAISS index over L2-normalised image embeddings, inner product (= cosine);
                                vector id i is row i of the metadata
    INDEX_DIR/metadata.parquet  one row per vector: key, caption, url, shard (tar path relative to shards_dir),
                                member (the image's name in the tar), offset and size (its bytes in the tar)
    INDEX_DIR/index.json        {"format": "clipforge.index.v1", "checkpoint", "shards_dir", "dim", "num_vectors",
                                "factory", "metric", "search_params", ...}: written last, the commit marker

Each file is written atomically, index.json after the other two, so a reader that finds index.json finds the
index and metadata it describes (a rebuild replaces all three). No faiss here: the caller writes the index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa

from trainer.clip.formats.atomic import atomic_write, atomic_write_json, read_json

INDEX_FORMAT = "clipforge.index.v1"
INDEX_FILE, META_FILE, INFO_FILE = "image.index", "metadata.parquet", "index.json"
METADATA_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("url", pa.string()),
                             ("shard", pa.string()), ("member", pa.string()), ("offset", pa.int64()),
                             ("size", pa.int64())])


class IndexFormatError(ValueError):
    """An index dir is missing or of an unknown format."""


def write_index_dir(out: str | Path, write_index: Callable[[str], object], metadata: pa.Table, info: dict) -> None:
    """write_index(path) writes the FAISS index; metadata follows METADATA_SCHEMA; info becomes index.json."""
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / INDEX_FILE, write_index)
    atomic_write(out / META_FILE, lambda tmp: pq.write_table(metadata.cast(METADATA_SCHEMA), tmp))
    atomic_write_json(out / INFO_FILE, {"format": INDEX_FORMAT, **info})


def read_index_info(index_dir: str | Path) -> dict:
    """INDEX_DIR/index.json, checked. Raises IndexFormatError."""
    path = Path(index_dir) / INFO_FILE
    if not path.is_file():
        raise IndexFormatError(f"index not found: {path} does not exist (build one with python -m indexing.build)")
    try:
        info = read_json(path)
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"cannot read {path}: {e}") from e
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise IndexFormatError(f"{path}: unknown format {found!r}, expected {INDEX_FORMAT!r}")
    return info
