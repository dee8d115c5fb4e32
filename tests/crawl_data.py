"""Synthetic crawl dirs in the crawl contract (trainer.clip.formats.crawl), for the filter and shard tests and the
scale benchmark: NNNNN.parquet (every row), NNNNN.tar (the successes' images), NNNNN_stats.json (the marker)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from trainer.clip.formats.crawl import crawl_shard
from trainer.clip.formats.tars import TarSink

CRAWL_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("error_class", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()), ("sha256", pa.string()),
])


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def row(key: str, caption: str | None, image: bytes | None, size=(256, 256), status: str = "success",
        url: str | None = None, **extra) -> dict:
    """One crawl row; an image makes it a success with its sha256 and sizes."""
    ok = image is not None and status == "success"
    return {"url": url or f"http://example.com/{key}.jpg", "caption": caption, "key": key,
            "status": status if image is not None or status != "success" else "failed_to_download",
            "error_message": None if ok else "synthetic failure", "error_class": None if ok else "http_error",
            "width": size[0] if ok else None, "height": size[1] if ok else None,
            "original_width": size[0] if ok else None, "original_height": size[1] if ok else None,
            "exif": None, "sha256": hashlib.sha256(image).hexdigest() if ok else None, "_image": image, **extra}


def write_crawl_shard(root: str | Path, shard_id: int, rows: list[dict], extra_schema=()) -> None:
    """rows: dicts from row() (their `_image` goes into the tar)."""
    files = crawl_shard(root, shard_id)
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(files.tar, "wb") as f:
        sink = TarSink(f)
        for r in rows:
            if r["_image"] is not None and r["status"] == "success":
                meta = {k: v for k, v in r.items() if k != "_image"}
                sink.write({"__key__": r["key"], "jpg": r["_image"], "txt": r["caption"] or "",
                            "json": json.dumps(meta)})
        sink.close()
    schema = pa.schema([*CRAWL_SCHEMA, *extra_schema])
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    pq.write_table(table, files.parquet)
    ok = sum(r["status"] == "success" for r in rows)
    files.stats.write_text(json.dumps({"count": len(rows), "successes": ok, "failed_to_download": len(rows) - ok}))


def write_rows_only(root: str | Path, shard_id: int, table: pa.Table) -> None:
    """A crawl shard of parquet rows without a tar (the scale test: no image-based step runs)."""
    files = crawl_shard(root, shard_id)
    Path(root).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, files.parquet)
    files.stats.write_text(json.dumps({"count": table.num_rows}))
