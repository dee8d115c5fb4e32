"""Stage 2 — filter: decide keep / drop for every crawled row, with a reason for every drop.

Reads  CRAWL_DIR (img2dataset webdataset output: the per-shard `.parquet` of every shard that has a `_stats.json`;
       `crawl_manifest.json` when our crawl wrote it).
Writes FILTER_DIR/decisions.parquet  one row per input row:
           key, url, caption, shard (crawl tar name), width, height, original_width, original_height, sha256,
           keep (bool), reason (null when kept, else one of REASONS), detail (free text)
       FILTER_DIR/filter_manifest.json  config, crawl dir, counts per reason, kept count (written last, atomic)

Rules are pure functions `row -> None | (reason, detail)`, applied in order (the first failing rule is the reason);
exact duplicates (same sha256 of the image bytes) are found afterwards among the survivors with a DuckDB window,
keeping the first key. Rerunning overwrites both files atomically.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from trainer.clip.formats.crawl import CRAWL_COLUMNS, carried_fields, complete_shards
from trainer.clip.flags import CLI, opt, run_main
from trainer.clip.formats.decisions import DECISIONS, write_decisions

REASONS = ("crawl_failed", "caption_too_short", "image_too_small", "aspect_ratio", "duplicate")


@dataclass
class FilterConfig:
    """The rules' thresholds (LAION: alt-text >= 5 chars; DataComp: > 2 words, shorter side >= 200, aspect <= 3)."""
    crawl_dir: str = opt("", positional=True, help="CRAWL_DIR: img2dataset webdataset output")
    output_dir: str = opt("", positional=True, help="FILTER_DIR to write")
    min_caption_chars: int = opt(5, help="captions shorter than this are dropped")
    min_caption_words: int = opt(1, help="captions with fewer words are dropped")
    min_image_side: int = opt(64, help="images whose original shorter side is smaller are dropped")
    max_aspect_ratio: float = opt(3.0, help="images more elongated than this are dropped")
    dedup: bool = opt(True, help="drop exact duplicates (same sha256 of the image bytes; the smallest key stays)")

    @classmethod
    def tiny(cls, crawl_dir: str, output_dir: str) -> "FilterConfig":
        return cls(crawl_dir=crawl_dir, output_dir=output_dir, min_image_side=48)


# ---- rules: pure functions row -> None (keep) or (reason, detail) -------------------------------------------------

def crawl_status(row: dict, cfg: FilterConfig):
    if row["status"] != "success":
        return "crawl_failed", f"{row['status']}: {row.get('error_message') or ''}".strip()


def caption_length(row: dict, cfg: FilterConfig):
    text = (row.get("caption") or "").strip()
    if len(text) < cfg.min_caption_chars or len(text.split()) < cfg.min_caption_words:
        return "caption_too_short", f"{len(text)} chars, {len(text.split())} words"


def image_size(row: dict, cfg: FilterConfig):
    w, h = row.get("original_width") or row.get("width"), row.get("original_height") or row.get("height")
    if not w or not h or min(w, h) < cfg.min_image_side:
        return "image_too_small", f"{w}x{h}"


def aspect_ratio(row: dict, cfg: FilterConfig):
    w, h = row.get("original_width") or row.get("width"), row.get("original_height") or row.get("height")
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        return "aspect_ratio", f"{w}x{h}"


RULES = [crawl_status, caption_length, image_size, aspect_ratio]


def decide(row: dict, cfg: FilterConfig):
    for rule in RULES:
        verdict = rule(row, cfg)
        if verdict:
            return verdict
    return None


# ---- the stage ----------------------------------------------------------------------------------------------------

def crawl_parquets(crawl_dir: str) -> list[str]:
    """Per-shard parquet files of the complete crawl shards (trainer.clip.formats.crawl)."""
    return [str(s.parquet) for s in complete_shards(crawl_dir) if s.parquet.exists()]


def run(cfg: FilterConfig) -> dict:
    files = crawl_parquets(cfg.crawl_dir)
    if not files:
        raise FileNotFoundError(f"no complete crawl shards (*_stats.json + .parquet) in {cfg.crawl_dir!r}")
    con = duckdb.connect()
    table = con.sql(
        "SELECT * EXCLUDE (filename), regexp_replace(filename, '^.*/|\\.parquet$', '', 'g') || '.tar' AS shard "
        "FROM read_parquet(?, filename=true, union_by_name=true) ORDER BY key", params=[files]).to_arrow_table()
    carried = carried_fields(table.schema, (*CRAWL_COLUMNS, "shard"))  # the input's extra columns, kept
    rows = table.to_pylist()
    for r in rows:
        verdict = decide(r, cfg)
        r["keep"] = verdict is None
        r["reason"], r["detail"] = verdict if verdict else (None, None)

    if cfg.dedup:  # first key per sha256 among the survivors wins
        survivors = pa.table({"key": [r["key"] for r in rows if r["keep"]],
                              "sha256": [r["sha256"] for r in rows if r["keep"]]})
        dups = con.execute(
            "SELECT key, first_value(key) OVER (PARTITION BY sha256 ORDER BY key) AS first_key "
            "FROM survivors QUALIFY key <> first_key").fetchall()
        first_of = dict(dups)
        for r in rows:
            if r["key"] in first_of:
                r["keep"], r["reason"], r["detail"] = False, "duplicate", f"same sha256 as {first_of[r['key']]}"

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    counts = {reason: 0 for reason in REASONS}
    for r in rows:
        if not r["keep"]:
            counts[r["reason"]] += 1
    manifest = {"config": asdict(cfg), "crawl_dir": os.path.abspath(cfg.crawl_dir), "input_rows": len(rows),
                "kept": sum(r["keep"] for r in rows), "dropped": counts}
    manifest = write_decisions(cfg.output_dir, rows, manifest, carried)
    return manifest


def report(m: dict, output_dir: str) -> int:
    dropped = ", ".join(f"{k} {v}" for k, v in m["dropped"].items() if v)
    print(f"filter: kept {m['kept']}/{m['input_rows']} (dropped: {dropped or 'none'}) "
          f"-> {output_dir}/{DECISIONS}", flush=True)
    return 0


def main(argv=None) -> int:
    cli = CLI(FilterConfig, prog="clipforge filter", description=__doc__.split("\n")[0])
    return run_main(cli, argv, lambda cfg: report(run(cfg), cfg.output_dir), (FileNotFoundError,), prefix="filter")


if __name__ == "__main__":
    raise SystemExit(main())
