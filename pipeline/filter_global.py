"""The filter stage's global steps: what needs every shard's rows at once, done out of core in DuckDB.

Reads  FILTER_DIR/_clipforge/features/part-*.parquet (the row rules' survivors) and _clipforge/scores/ (CLIP
       scores), emb/img-*.npy for SemDeDup.
Writes FILTER_DIR/_clipforge/global/<reason>.parquet per step: key, shard, reason, detail, duplicate_of (sorted by
       shard, so a ledger task reads only its own shard's row groups); clusters.parquet (SemDeDup);
       FILTER_DIR/terms.parquet (balancing).

The survivors live in a table of an on-disk DuckDB database (_clipforge/global/work.duckdb) that spills to
_clipforge/tmp past the memory limit; each step reads the survivors, writes its drops, and deletes them from the
table, in the order of trainer.clip.formats.ledger.REASONS. Rerun: the directory is recreated from the features.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.common import duckdb_connect, sql_str
from trainer.clip.formats.ledger import WORK_DIR, embedding_paths

DROP_COLUMNS = "key, shard, reason, detail, duplicate_of"


def _survivors(con, cfg, ids: list[int]) -> int:
    from pipeline.clipscore import scores_path
    from pipeline.filter_part import features_path

    out = Path(cfg.output_dir)
    files = [str(features_path(out, i)) for i in ids]
    cols = ["key", "shard", "part_row", "sha256", "pair_sha256",
            "phash" if cfg.dedup.near_dup else "NULL::BIGINT AS phash",
            "terms" if cfg.balance.enabled else "NULL::VARCHAR[] AS terms"]
    con.execute(f"CREATE TABLE survivors AS SELECT {', '.join(cols)}, NULL::FLOAT AS clip_score "
                f"FROM read_parquet([{', '.join(map(sql_str, files))}]) WHERE reason IS NULL")
    scores = [scores_path(out, i) for i in ids]
    scores = [str(p) for p in scores if p.exists()]
    if scores:
        con.execute(f"""UPDATE survivors s SET clip_score = x.clip_score FROM (
            SELECT regexp_extract(filename, 'part-(\\d+)\\.parquet$', 1) || '.tar' AS shard, part_row, clip_score
            FROM read_parquet([{', '.join(map(sql_str, scores))}], filename = true)) x
            WHERE s.shard = x.shard AND s.part_row = x.part_row""")
    return con.execute("SELECT count(*) FROM survivors").fetchall()[0][0]


def _clip_step(con, cfg, drops: Path) -> dict:
    c = cfg.clip
    if c.clip_mode == "top_fraction":
        thr = con.execute(f"SELECT approx_quantile(clip_score, {1.0 - c.clip_top_fraction}) FROM survivors "
                          "WHERE clip_score IS NOT NULL").fetchall()[0][0]
        thr = float("inf") if thr is None else float(thr)
    else:
        thr = float(c.clip_threshold)
    con.execute(f"""COPY (SELECT key, shard, 'clip_score' AS reason,
            CASE WHEN clip_score IS NULL THEN 'image could not be scored'
                 ELSE printf('clip score %.4f < %.4f', clip_score, {thr}) END AS detail, NULL::VARCHAR AS duplicate_of
        FROM survivors WHERE clip_score IS NULL OR clip_score < {thr} ORDER BY shard, key) TO {sql_str(drops)}
        (FORMAT parquet)""")
    return {"threshold": thr, "mode": c.clip_mode}


def _steps(cfg, work: Path):
    """(reason, run(con, drops) -> extra info) of the steps the config turns on, in REASONS order."""
    from pipeline import dedup
    from pipeline.balance import balance

    d = cfg.dedup
    steps = []
    if cfg.clip.clip_checkpoint and cfg.clip.clip_mode != "off":
        steps.append(("clip_score", lambda con, p: _clip_step(con, cfg, p)))
    if d.exact_image:
        steps.append(("duplicate_image",
                      lambda con, p: dedup.exact_duplicates(con, "survivors", "sha256", "duplicate_image", p)))
    if d.exact_pair:
        steps.append(("duplicate_pair",
                      lambda con, p: dedup.exact_duplicates(con, "survivors", "pair_sha256", "duplicate_pair", p)))
    if d.near_dup:
        def near(con, p):
            stats: dict = {}
            dedup.near_duplicates(con, "survivors", d, p, stats=stats)
            return {"stats": stats}
        steps.append(("near_duplicate", near))
    if d.semantic_dup:
        def semantic(con, p):
            load = lambda sid: np.load(embedding_paths(cfg.output_dir, sid)[0], mmap_mode="r")  # noqa: E731
            stats: dict = {}
            dedup.semantic_duplicates(con, "survivors", d, load, p, work / "clusters.parquet", stats=stats)
            return {"clusters": str(work / "clusters.parquet"), "stats": stats}
        steps.append(("semantic_duplicate", semantic))
    if cfg.balance.enabled:
        def balanced(con, p):
            terms = Path(cfg.output_dir) / "terms.parquet"
            balance(con, "survivors", cfg.balance, p, terms)
            return {"terms": str(terms)}
        steps.append(("balanced_out", balanced))
    return steps


def run_global(cfg, ids: list[int]) -> dict:
    """Every enabled global step over the survivors of the row rules. -> {reason: {"drops": parquet path,
    "dropped": n, "seconds": s, ...}}"""
    work = Path(cfg.output_dir) / WORK_DIR / "global"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    steps = _steps(cfg, work)
    out: dict = {}
    if not steps or not ids:
        return out
    con = duckdb_connect(str(work / "work.duckdb"), cfg.memory_limit, str(Path(cfg.output_dir) / WORK_DIR / "tmp"))
    try:
        t0 = time.time()
        n = _survivors(con, cfg, ids)
        out["survivors"] = {"rows": n, "seconds": round(time.time() - t0, 2), "dropped": 0}
        for reason, step in steps:
            t0, drops = time.time(), work / f"{reason}.parquet"
            extra = step(con, drops) or {}
            extra = extra if isinstance(extra, dict) else {}
            dropped = con.execute(f"SELECT count(*) FROM read_parquet({sql_str(drops)})").fetchall()[0][0]
            con.execute(f"DELETE FROM survivors WHERE key IN (SELECT key FROM read_parquet({sql_str(drops)}))")
            out[reason] = {"drops": str(drops), "dropped": dropped, "seconds": round(time.time() - t0, 2), **extra}
    finally:
        con.close()
        (work / "work.duckdb").unlink(missing_ok=True)
    return out
