"""The filter dir contract: one decision per crawled row, read by `clipforge shard`.

    FILTER_DIR/decisions.parquet      one row per crawled row (DECISIONS_SCHEMA): key, url, caption, shard (the crawl
                                      tar holding the sample), width, height, original_width, original_height,
                                      sha256, keep, reason (null when kept, else why it was dropped), detail
    FILTER_DIR/filter_manifest.json   {"format": "clipforge.filter.v1", "config", "crawl_dir", "input_rows", "kept",
                                      "dropped": {reason: count}, "decisions": "decisions.parquet"}: written last

Both are written atomically; a rerun replaces them.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from trainer.clip.formats.atomic import atomic_write, atomic_write_json, read_json

FILTER_FORMAT = "clipforge.filter.v1"
DECISIONS, FILTER_MANIFEST = "decisions.parquet", "filter_manifest.json"
DECISIONS_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("shard", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("sha256", pa.string()), ("keep", pa.bool_()), ("reason", pa.string()), ("detail", pa.string()),
])


def write_decisions(filter_dir: str | Path, rows: list[dict], manifest: dict, carried: list | tuple = ()) -> dict:
    """decisions.parquet from `rows` (dicts with DECISIONS_SCHEMA's columns, then the crawl's carried input
    columns `carried`: pyarrow fields), then filter_manifest.json."""
    import pyarrow.parquet as pq

    out = Path(filter_dir)
    schema = pa.schema([*DECISIONS_SCHEMA, *carried])
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    atomic_write(out / DECISIONS, lambda tmp: pq.write_table(table, tmp))
    manifest = {"format": FILTER_FORMAT, **manifest, "decisions": DECISIONS}
    atomic_write_json(out / FILTER_MANIFEST, manifest)
    return manifest


def read_filter_manifest(filter_dir: str | Path) -> dict:
    return read_json(Path(filter_dir) / FILTER_MANIFEST)


def decisions_path(filter_dir: str | Path) -> Path:
    return Path(filter_dir) / DECISIONS
