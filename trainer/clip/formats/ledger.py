"""The filter dir contract: the ledger (one row per crawled URL, every decision about it), the embeddings the
CLIP-score step computed, the metadata term counts, and the manifest. Read by `clipforge shard`, `clipforge stats`,
the indexer, and by DuckDB directly:

    duckdb -c "select reason, count(*) from 'FILTER_DIR/ledger/*.parquet' group by 1"

    FILTER_DIR/ledger/part-NNNNN.parquet   one per crawl shard NNNNN (its rows in the crawl parquet's order):
                                           LEDGER_SCHEMA, then the crawl's carried input columns
    FILTER_DIR/emb/img-NNNNN.npy           float16 [rows of part NNNNN, D], L2-normalised image embeddings,
    FILTER_DIR/emb/txt-NNNNN.npy           row-aligned with the ledger part (row i = the part's row `part_row` i);
                                           rows that were not scored are zero vectors (their clip_score is null)
    FILTER_DIR/emb/info.json               {"checkpoint", "weights_sha256", "dim", "dtype"}: which model made them
    FILTER_DIR/terms.parquet               metadata balancing: term, matches_before, kept_after, probability
    FILTER_DIR/filter_manifest.json        {"format": "clipforge.filter.v2", "config", "crawl_dir", "fingerprint",
                                           "input_rows", "kept", "dropped": {reason: n}, "parts": [{"part", "rows",
                                           "kept"}], "ledger": "ledger", "embeddings": bool}: written last
    FILTER_DIR/_clipforge/                 the stage's work files (features, scores, global decisions, DuckDB spill)

A reader trusts only the parts the manifest lists. Every file is written atomically; a rerun replaces them.
Reasons (column `reason`, null when kept) are REASONS' values, in the order the stage applies them; a duplicate
names the key it duplicates in `duplicate_of`.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from trainer.clip.formats.atomic import atomic_write, atomic_write_json, read_json

FILTER_FORMAT = "clipforge.filter.v2"
LEDGER_DIR, EMB_DIR, FILTER_MANIFEST, TERMS = "ledger", "emb", "filter_manifest.json", "terms.parquet"
WORK_DIR = "_clipforge"

# the stage's reasons, in the order it applies them (the first that applies is the row's reason)
REASONS = (
    "crawl_failed",        # the crawl has no image for the row (status != success)
    "caption_too_short",   # fewer characters or words than the rules allow
    "caption_too_long",    # more characters than the rules allow (a 20,000-character alt text)
    "language",            # language ID says the caption is not in an allowed language (or not confidently)
    "image_too_small",     # the original image's shorter side is below the minimum
    "aspect_ratio",        # the original image is more elongated than allowed
    "clip_score",          # image-caption cosine below the threshold (or outside the top fraction)
    "duplicate_image",     # same sha256 of the image bytes as `duplicate_of`
    "duplicate_pair",      # same sha256 of (url, caption) as `duplicate_of`
    "near_duplicate",      # pHash within the Hamming threshold of `duplicate_of`
    "semantic_duplicate",  # image embedding cosine above the threshold with `duplicate_of` (SemDeDup)
    "no_metadata_match",   # the caption matches no metadata term (balancing on)
    "balanced_out",        # every term the caption matches was over its cap and the seeded draw dropped it
)

LEDGER_SCHEMA = pa.schema([
    # from the crawl parquet
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("shard", pa.string()),            # the crawl tar holding the sample, e.g. "00012.tar"
    ("part_row", pa.int32()),          # the row's index in its ledger part (and in its emb/*.npy)
    ("status", pa.string()), ("error_class", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("sha256", pa.string()),           # of the image bytes, as the crawl computed it
    # where the image is in the crawl tar (null without an image)
    ("image_ext", pa.string()), ("image_offset", pa.int64()), ("image_size", pa.int64()),
    # features
    ("pair_sha256", pa.string()),      # sha256 of url + "\n" + caption
    ("caption_chars", pa.int32()), ("caption_words", pa.int32()),
    ("language", pa.string()), ("language_score", pa.float32()),
    ("phash", pa.int64()),             # 64-bit DCT perceptual hash of the image (imagehash.phash), as signed int64
    ("terms", pa.list_(pa.string())),  # metadata terms found in the caption (balancing on)
    ("clip_score", pa.float32()),      # cosine of the image and caption embeddings (CLIP score on)
    ("cluster", pa.int32()),           # k-means cluster of the image embedding (semantic dedup on)
    # the decision
    ("keep", pa.bool_()), ("reason", pa.string()), ("detail", pa.string()), ("duplicate_of", pa.string()),
])
LEDGER_COLUMNS = tuple(LEDGER_SCHEMA.names)


def part_name(shard_id: int) -> str:
    return f"part-{shard_id:05d}"


def ledger_dir(filter_dir: str | Path) -> Path:
    return Path(filter_dir) / LEDGER_DIR


def ledger_part(filter_dir: str | Path, shard_id: int) -> Path:
    return ledger_dir(filter_dir) / f"{part_name(shard_id)}.parquet"


def embedding_paths(filter_dir: str | Path, shard_id: int) -> tuple[Path, Path]:
    """(image, text) .npy of a part, row-aligned with the ledger part."""
    emb = Path(filter_dir) / EMB_DIR
    return emb / f"img-{shard_id:05d}.npy", emb / f"txt-{shard_id:05d}.npy"


def ledger_schema(carried=()) -> pa.Schema:
    """LEDGER_SCHEMA plus the crawl's carried input columns (pyarrow fields)."""
    return pa.schema([*LEDGER_SCHEMA, *carried])


def write_ledger_part(path: str | Path, table: pa.Table) -> None:
    """One ledger part, atomically; `table` must start with LEDGER_SCHEMA's columns (cast to it)."""
    import pyarrow.parquet as pq

    own = table.select(list(LEDGER_COLUMNS)).cast(LEDGER_SCHEMA)
    extra = [c for c in table.column_names if c not in LEDGER_COLUMNS]
    out = pa.Table.from_arrays([*own.columns, *(table.column(c) for c in extra)],
                               schema=pa.schema([*LEDGER_SCHEMA, *(table.schema.field(c) for c in extra)]))
    atomic_write(path, lambda tmp: pq.write_table(out, tmp, row_group_size=64_000))


def write_filter_manifest(filter_dir: str | Path, manifest: dict) -> dict:
    manifest = {"format": FILTER_FORMAT, **manifest, "ledger": LEDGER_DIR}
    atomic_write_json(Path(filter_dir) / FILTER_MANIFEST, manifest)
    return manifest


class LedgerError(ValueError):
    """A filter dir without a (readable, current-format) manifest."""


def read_filter_manifest(filter_dir: str | Path) -> dict:
    path = Path(filter_dir) / FILTER_MANIFEST
    if not path.exists():
        raise LedgerError(f"{path} does not exist: run `clipforge filter` first")
    m = read_json(path)
    if m.get("format") != FILTER_FORMAT:
        raise LedgerError(f"{path}: format {m.get('format')!r}, expected {FILTER_FORMAT!r} (re-run the filter)")
    return m


def ledger_files(filter_dir: str | Path, manifest: dict | None = None) -> list[Path]:
    """The ledger parts the manifest lists (readers trust only those), in part order."""
    m = manifest or read_filter_manifest(filter_dir)
    return [ledger_dir(filter_dir) / f"{p['part']}.parquet" for p in m["parts"]]
