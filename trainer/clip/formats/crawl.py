"""The crawl dir contract: img2dataset's webdataset output layout, plus clipforge's crawl manifest.

    CRAWL_DIR/{id:05d}.tar          the shard's successful samples: KEY.jpg, KEY.txt, KEY.json (KEY = 9 digits)
    CRAWL_DIR/{id:05d}.parquet      every input row of the shard: url, caption, key, status, error_message, width,
                                    height, original_width, original_height, sha256, exif (+ extra columns)
    CRAWL_DIR/{id:05d}_stats.json   written last by img2dataset: the shard is complete ("successes", "status_dict")
    CRAWL_DIR/_clipforge/crawl_manifest.json
                                    {"format": "clipforge.crawl.v1", ...}: complete and failed shards, totals, errors
                                    (in a subfolder: img2dataset's incremental mode parses every top-level *.json
                                    name as a shard id)

A shard counts as crawled only once its _stats.json exists (`complete_shards`); readers ignore the others.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CRAWL_FORMAT = "clipforge.crawl.v1"
CRAWL_MANIFEST = "_clipforge/crawl_manifest.json"
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


def complete_shards(root: str | Path) -> list[CrawlShard]:
    """The complete shards under ROOT (those with a _stats.json), by id."""
    ids = []
    for p in Path(root).glob(f"*{STATS_SUFFIX}"):
        stem = p.name[: -len(STATS_SUFFIX)]
        if re.fullmatch(r"\d+", stem):
            ids.append(int(stem))
    return [crawl_shard(root, i) for i in sorted(ids)]
