"""The crawl dir contract: img2dataset's webdataset output layout, plus clipforge's crawl manifest.

    CRAWL_DIR/{id:05d}.tar          the shard's successful samples: KEY.jpg, KEY.txt, KEY.json (KEY = 9 digits)
    CRAWL_DIR/{id:05d}.parquet      every input row of the shard: url, caption, key, status, error_message, width,
                                    height, original_width, original_height, sha256, exif (+ extra columns)
    CRAWL_DIR/{id:05d}_stats.json   the shard's completion marker, written last and atomically (img2dataset's keys
                                    "count", "successes", "status_dict", ... plus "fingerprint", "error_classes",
                                    "node_id", timings)
    CRAWL_DIR/_clipforge/crawl_plan.json
                                    written first: the input files with their row counts, the input fingerprint and
                                    the config fingerprint; a rerun with a different input or layout is refused
    CRAWL_DIR/_clipforge/crawl_manifest.json
                                    {"format": "clipforge.crawl.v1", ...}: complete and failed shards, totals, error
                                    classes, throughput, per-shard timings (written at the end, also when a run fails)
    CRAWL_DIR/_clipforge/tmp/       a shard task's scratch dir; its tar and parquet are moved into place, then the
                                    marker is written (in a subfolder: img2dataset's incremental mode parses every
                                    top-level *.json name as a shard id)

A shard counts as crawled only once its marker exists and parses (`complete_shards`; with a fingerprint, only the
markers of that crawl); readers ignore the others. A tar or parquet without a marker is uncommitted: a rerun
deletes it and redoes the shard.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

CRAWL_FORMAT = "clipforge.crawl.v1"
CRAWL_MANIFEST = "_clipforge/crawl_manifest.json"
CRAWL_PLAN = "_clipforge/crawl_plan.json"
CRAWL_TMP = "_clipforge/tmp"
# the crawl's own parquet columns; any other column is an input column the crawl carried (every later stage keeps it)
CRAWL_COLUMNS = ("url", "caption", "key", "status", "error_message", "error_class", "width", "height",
                 "original_width", "original_height", "exif", "sha256")


def carried_fields(schema, own=CRAWL_COLUMNS) -> list:
    """The fields of `schema` that are carried input columns (not in `own`)."""
    return [f for f in schema if f.name not in own]
STATS_SUFFIX = "_stats.json"


@dataclass(frozen=True)
class CrawlShard:
    id: int
    tar: Path
    parquet: Path
    stats: Path


def crawl_shard(root: str | Path, shard_id: int) -> CrawlShard:
    stem = Path(root) / f"{shard_id:05d}"
    return CrawlShard(shard_id, stem.with_suffix(".tar"), stem.with_suffix(".parquet"),
                      stem.with_name(stem.name + STATS_SUFFIX))


def stats_path(tar: str | Path) -> Path:
    """A shard tar's completion marker: 00012.tar -> 00012_stats.json."""
    tar = Path(tar)
    return tar.with_name(f"{tar.stem}{STATS_SUFFIX}")


def read_marker(path: str | Path) -> dict | None:
    """A shard's marker, or None if it is missing or does not parse (a marker is written atomically, so a torn
    one can only come from another writer; it never counts)."""
    try:
        marker = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def complete_shards(root: str | Path, fingerprint: str | None = None) -> list[CrawlShard]:
    """The complete shards under ROOT (a marker that parses; with `fingerprint`, only that crawl's), by id."""
    ids = []
    for p in Path(root).glob(f"*{STATS_SUFFIX}"):
        stem = p.name[: -len(STATS_SUFFIX)]
        if not re.fullmatch(r"\d+", stem):
            continue
        marker = read_marker(p)
        if marker is not None and (fingerprint is None or marker.get("fingerprint") == fingerprint):
            ids.append(int(stem))
    return [crawl_shard(root, i) for i in sorted(ids)]


def shard_files(root: str | Path) -> list[Path]:
    """Every top-level shard file (NNNNN.tar / .parquet / _stats.json) under ROOT, committed or not."""
    return sorted(p for p in Path(root).glob("*") if re.fullmatch(r"\d+(\.tar|\.parquet|_stats\.json)", p.name))


class CrawlShardWriter:
    """One crawl shard in img2dataset's layout, written into DIR (a scratch dir; the caller commits the files):
    NNNNN.tar gets each success as KEY.{image ext}, KEY.txt (caption), KEY.json (its metadata, indent 4);
    NNNNN.parquet gets every row's metadata (`schema`), buffered `buffer_rows` at a time."""

    def __init__(self, directory: str | Path, shard_id: int, schema, image_ext: str, buffer_rows: int = 1000):
        import pyarrow.parquet as pq

        from trainer.clip.formats.tars import TarSink

        self.files = crawl_shard(directory, shard_id)
        self.schema, self.ext, self.buffer_rows, self.rows = schema, image_ext, buffer_rows, []
        self._tar_file = open(self.files.tar, "wb")
        self.tar = TarSink(self._tar_file)
        self.parquet = pq.ParquetWriter(self.files.parquet, schema)

    def write(self, image: bytes | None, key: str, caption: str | None, meta: dict) -> None:
        if image is not None:
            self.tar.write({"__key__": key, self.ext: image, "txt": "" if caption is None else str(caption),
                            "json": json.dumps(meta, indent=4)})
        self.rows.append(meta)
        if len(self.rows) >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.parquet.close()
        self.tar.close()
        self._tar_file.close()
