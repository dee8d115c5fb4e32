"""The filter stage's per-crawl-shard work (each call is one Ray task; `pipeline.filter` plans and runs them).

    features(job) -> counts   crawl NNNNN.parquet + NNNNN.tar -> FILTER_DIR/_clipforge/features/part-NNNNN.parquet
    assemble(job) -> counts   features + CLIP scores + the global steps' drops -> FILTER_DIR/ledger/part-NNNNN.parquet

features: every crawled row, in the crawl parquet's order, with `part_row`, where its image sits in the crawl tar
(`image_ext`, `image_offset`, `image_size`: read from the tar's headers, no image decoded unless the pHash is on),
`pair_sha256`, caption length, language + confidence, pHash, matched metadata terms, and the row rules' verdict
(`reason`, `detail`). The file carries the fingerprint of everything it depends on (the crawl marker, the rules, the
term list); a rerun reuses a part whose fingerprint matches and recomputes the others.

assemble: joins the part's rows with its CLIP scores (`_clipforge/scores/part-NNNNN.parquet`), its k-means clusters
and the drops of every global step (parquet files sorted by shard, read with a filter on this shard), and writes the
ledger part (trainer.clip.formats.ledger): `keep`, `reason`, `detail`, `duplicate_of` decided for every row.
Both write atomically; neither reads another part's rows.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.common import ray_node_id
from trainer.clip.formats.atomic import atomic_write
from trainer.clip.formats.crawl import CRAWL_COLUMNS, carried_fields, crawl_shard
from trainer.clip.formats.ledger import (LEDGER_COLUMNS, LEDGER_SCHEMA, REASONS, WORK_DIR, ledger_part, part_name,
                                         write_ledger_part)
from trainer.clip.formats.shards import IMAGE_EXTS, iter_tar_samples
from trainer.clip.procinfo import peak_rss_bytes

FEATURES = f"{WORK_DIR}/features"
FAULT_ENV = "CLIPFORGE_FILTER_FAULT"  # a test hook: "sleep:S" slows every part task by S seconds


def _fault() -> None:
    kind, _, arg = os.environ.get(FAULT_ENV, "").partition(":")
    if kind == "sleep":
        time.sleep(float(arg))


@dataclass(frozen=True)
class PartJob:
    """One crawl shard's work, as sent to a Ray task (plain data)."""
    shard_id: int
    crawl_dir: str
    filter_dir: str
    rules: dict                       # RulesConfig as a dict
    phash: bool = False               # compute the pHash (decodes every image)
    terms: str = ""                   # metadata term list ("" = no matching)
    case_sensitive: bool = False
    require_images: bool = True       # a success without its image in the tar becomes status image_missing
    fingerprint: str = ""             # of the stage settings that change the features
    drops: tuple = ()                 # assemble: the global steps' drop files
    clusters: str = ""                # assemble: the semantic dedup's cluster file ("" = none)

    def __repr__(self) -> str:  # what run_tasks prints on a retry
        return part_name(self.shard_id)


def features_path(filter_dir: str | Path, shard_id: int) -> Path:
    return Path(filter_dir) / FEATURES / f"{part_name(shard_id)}.parquet"


def part_fingerprint(job: PartJob) -> str:
    """The job's settings + the crawl shard's marker (a re-crawled shard has another marker)."""
    marker = crawl_shard(job.crawl_dir, job.shard_id).stats
    h = hashlib.sha256(job.fingerprint.encode())
    h.update(marker.read_bytes() if marker.exists() else b"")
    return h.hexdigest()[:16]


def _stored_fingerprint(path: Path) -> str | None:
    try:
        return (pq.read_schema(path).metadata or {}).get(b"fingerprint", b"").decode()
    except (OSError, pa.ArrowInvalid):
        return None


# ---- features ----------------------------------------------------------------------------------------------------
def _tar_index(tar: Path, read_images: bool) -> tuple[dict, dict]:
    """key -> (ext, data offset, size), and key -> image bytes when asked; a damaged tar yields what it can."""
    where, images = {}, {}
    if not tar.exists():
        return where, images
    try:
        for sample in iter_tar_samples(tar, read=lambda e: read_images and e in IMAGE_EXTS):
            ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
            if ext:
                m = sample.members[ext]
                where[sample.key] = (ext, m.offset, m.size)
                if read_images:
                    images[sample.key] = m.data
    except (OSError, tarfile.TarError, EOFError):
        pass  # the rows after the damage have no image: counted as image_missing by the rules' crawl check
    return where, images


def _sha_pairs(urls: list, captions: list) -> list:
    return [hashlib.sha256(f"{u or ''}\n{c or ''}".encode()).hexdigest() for u, c in zip(urls, captions)]


def _feature_columns(t: pa.Table, job: PartJob, where: dict, images: dict) -> dict:
    from pipeline.rules import LanguageID, caption_features

    keys, captions = t.column("key").to_pylist(), t.column("caption").to_pylist()
    chars, words = caption_features(captions)
    cols = {"part_row": pa.array(np.arange(t.num_rows, dtype=np.int32)),
            "shard": pa.array([f"{job.shard_id:05d}.tar"] * t.num_rows, pa.string()),
            "image_ext": pa.array([where.get(k, (None,))[0] for k in keys], pa.string()),
            "image_offset": pa.array([where[k][1] if k in where else None for k in keys], pa.int64()),
            "image_size": pa.array([where[k][2] if k in where else None for k in keys], pa.int64()),
            "pair_sha256": pa.array(_sha_pairs(t.column("url").to_pylist(), captions), pa.string()),
            "caption_chars": pa.array(chars), "caption_words": pa.array(words)}
    langs, scores = (LanguageID()(captions) if job.rules.get("language_id", True)
                     else ([None] * t.num_rows, np.zeros(t.num_rows, np.float32)))
    cols["language"], cols["language_score"] = pa.array(langs, pa.string()), pa.array(scores)
    if job.phash:
        from pipeline.dedup import phash64

        cols["phash"] = pa.array([phash64(images[k]) if k in images else None for k in keys], pa.int64())
    if job.terms:
        from pipeline.balance import TermMatcher

        cols["terms"] = pa.array(TermMatcher.load(job.terms, job.case_sensitive)(captions), pa.list_(pa.string()))
    return cols


def features(job: PartJob) -> dict:
    """Write one features part (or reuse it). -> {"rows", "passed", "reused", "peak_rss"}."""
    from pipeline.rules import RulesConfig, apply_rules

    _fault()
    out, fingerprint = features_path(job.filter_dir, job.shard_id), part_fingerprint(job)
    if out.exists() and _stored_fingerprint(out) == fingerprint:
        meta = pq.read_metadata(out)
        return {"rows": meta.num_rows, "passed": int(meta.metadata[b"passed"]), "reused": True,
                "peak_rss": peak_rss_bytes(), "node": ray_node_id()}
    files = crawl_shard(job.crawl_dir, job.shard_id)
    t = pq.read_table(files.parquet)
    where, images = _tar_index(files.tar, job.phash)
    # a success whose image is not in the tar cannot be kept: the crawl's status says so from here on
    if job.require_images:
        status = [s if (s != "success" or k in where) else "image_missing"
                  for s, k in zip(t.column("status").to_pylist(), t.column("key").to_pylist())]
        t = t.set_column(t.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    for name, col in _feature_columns(t, job, where, images).items():
        t = t.append_column(name, col) if name not in t.column_names else t.set_column(
            t.schema.get_field_index(name), name, col)
    reason, detail = apply_rules(t, RulesConfig(**job.rules))
    t = t.append_column("reason", reason).append_column("detail", detail)
    passed = reason.null_count
    t = t.replace_schema_metadata({"fingerprint": fingerprint, "passed": str(passed)})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: pq.write_table(t, tmp))
    return {"rows": t.num_rows, "passed": passed, "reused": False, "peak_rss": peak_rss_bytes(), "node": ray_node_id()}


# ---- assemble ----------------------------------------------------------------------------------------------------
def _shard_rows(path: str, shard: str, columns: list[str]) -> pa.Table | None:
    if not path or not Path(path).exists():
        return None
    return pq.read_table(path, columns=columns, filters=[("shard", "=", shard)])


def _scores(filter_dir: str, shard_id: int, n: int) -> pa.Array:
    from pipeline.clipscore import scores_path

    path = scores_path(filter_dir, shard_id)
    score = np.full(n, np.nan, np.float32)
    if path.exists():
        t = pq.read_table(path, columns=["part_row", "clip_score"])
        rows = t.column("part_row").to_numpy()
        score[rows] = pc.fill_null(t.column("clip_score"), np.nan).to_numpy(zero_copy_only=False)
    return pa.array(score, pa.float32(), mask=np.isnan(score))


def _apply_drops(t: pa.Table, job: PartJob, shard: str) -> tuple[list, list, list]:
    reason, detail = t.column("reason").to_pylist(), t.column("detail").to_pylist()
    dup = [None] * t.num_rows
    row_of = {k: i for i, k in enumerate(t.column("key").to_pylist())}
    for path in job.drops:
        d = _shard_rows(path, shard, ["key", "reason", "detail", "duplicate_of"])
        if d is None:
            continue
        for key, r, why, of in zip(*(d.column(c).to_pylist() for c in ("key", "reason", "detail", "duplicate_of"))):
            i = row_of[key]
            if reason[i] is None:  # a row is dropped once: by the first step that drops it
                reason[i], detail[i], dup[i] = r, why, of
    return reason, detail, dup


def assemble(job: PartJob) -> dict:
    """Write one ledger part. -> {"rows", "kept", "dropped": {reason: n}, "peak_rss"}."""
    _fault()
    t = pq.read_table(features_path(job.filter_dir, job.shard_id))
    shard = f"{job.shard_id:05d}.tar"
    reason, detail, dup = _apply_drops(t, job, shard)
    cols = {"clip_score": _scores(job.filter_dir, job.shard_id, t.num_rows),
            "cluster": pa.nulls(t.num_rows, pa.int32()),
            "reason": pa.array(reason, pa.string()), "detail": pa.array(detail, pa.string()),
            "duplicate_of": pa.array(dup, pa.string()),
            "keep": pa.array([r is None for r in reason], pa.bool_())}
    clusters = _shard_rows(job.clusters, shard, ["part_row", "cluster"])
    if clusters is not None and clusters.num_rows:
        c = np.full(t.num_rows, -1, np.int64)
        c[clusters.column("part_row").to_numpy()] = clusters.column("cluster").to_numpy()
        cols["cluster"] = pa.array(c, pa.int32(), mask=c < 0)
    for name in LEDGER_COLUMNS:
        if name not in cols and name not in t.column_names:
            cols[name] = pa.nulls(t.num_rows, LEDGER_SCHEMA.field(name).type)
    for name, col in cols.items():
        i = t.schema.get_field_index(name)
        t = t.set_column(i, name, col) if i >= 0 else t.append_column(name, col)
    carried = [f.name for f in carried_fields(t.schema, (*CRAWL_COLUMNS, *LEDGER_COLUMNS))]
    t = t.select([*LEDGER_COLUMNS, *carried]).replace_schema_metadata(None)
    write_ledger_part(ledger_part(job.filter_dir, job.shard_id), t)
    dropped = {r: reason.count(r) for r in REASONS if r in reason}
    return {"rows": t.num_rows, "kept": reason.count(None), "dropped": dropped, "peak_rss": peak_rss_bytes(),
            "node": ray_node_id()}
