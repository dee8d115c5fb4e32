"""Stage 2 — filter (a Ray job): every crawled row gets keep or a reason, in one ledger.

    clipforge filter CRAWL_DIR FILTER_DIR [--preset none|basic|laion|datacomp-clip|demo] [--config FILE] [flags]

Reads  CRAWL_DIR: the complete crawl shards (`NNNNN.parquet` + `NNNNN.tar` with a `_stats.json` marker).
Writes FILTER_DIR (trainer.clip.formats.ledger): ledger/part-NNNNN.parquet (one row per crawled row, every column
       and decision), emb/ (image and text embeddings when the CLIP score runs), terms.parquet (balancing), and
       filter_manifest.json last.

The driver plans and the workers work:
  1. features, one Ray task per crawl shard (pipeline.filter_part): image location in the tar, caption length,
     language ID, pHash, metadata terms, and the row rules (pipeline.rules) -> _clipforge/features/;
  2. CLIP score on a Ray actor pool (pipeline.clipscore), for the rows the rules kept;
  3. the global steps, in DuckDB over an on-disk database that spills past --memory-limit (the driver never holds
     rows): CLIP threshold or top fraction (approximate quantile), exact dedup by image sha256 and by
     (url, caption), pHash near-dup with LSH banding, SemDeDup, metadata balancing — each on the previous one's
     survivors, each writing its drops (key, reason, detail, duplicate_of) sorted by shard;
  4. assemble, one Ray task per crawl shard: features + scores + drops -> the ledger part.
Rerun: the manifest is withdrawn first; features and scores whose fingerprints match are reused, the global steps
and the ledger are recomputed; ledger parts of shards no longer in the crawl are deleted. Exit 1 when a shard's task
fails every retry (listed in the manifest), 2 on a usage error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.balance import BalanceConfig
from pipeline.clipscore import ClipScoreConfig
from pipeline.dedup import DedupConfig
from pipeline.distribute import DistributeConfig, Progress, run_tasks
from pipeline.rules import RulesConfig
from trainer.clip.flags import CLI, opt, require, run_main, section
from trainer.clip.formats.crawl import complete_shards, read_marker
from trainer.clip.formats.ledger import (FILTER_MANIFEST, REASONS, WORK_DIR, LedgerError, ledger_dir, part_name,
                                         write_filter_manifest)
from trainer.clip.procinfo import peak_rss_bytes

DEMO_TERMS = str(Path(__file__).with_name("assets") / "demo_terms.txt")


@dataclass
class FilterConfig:
    """Curation of a crawl: row rules, CLIP score, dedup, metadata balancing; where the work runs."""
    crawl_dir: str = opt("", positional=True, help="CRAWL_DIR: the crawl's output")
    output_dir: str = opt("", positional=True, help="FILTER_DIR to write")
    memory_limit: str = opt("2GB", help="DuckDB's memory for the global steps; beyond it, it spills to "
                                        "FILTER_DIR/_clipforge/tmp")
    require_images: bool = opt(True, help="a crawl success whose image is not in its tar is dropped (status "
                                          "image_missing); --no-require-images curates the parquet rows alone")
    rules: RulesConfig = section(RulesConfig)
    clip: ClipScoreConfig = section(ClipScoreConfig)
    dedup: DedupConfig = section(DedupConfig)
    balance: BalanceConfig = section(BalanceConfig)
    distribute: DistributeConfig = section(DistributeConfig)

    def __post_init__(self):
        require(self, "memory_limit", self.memory_limit.strip()[:1].isdigit(), "must be a size like 2GB")

    @classmethod
    def tiny(cls, crawl_dir: str = "", output_dir: str = "") -> "FilterConfig":
        return dataclasses.replace(demo(), crawl_dir=crawl_dir, output_dir=output_dir)


# ---- presets -----------------------------------------------------------------------------------------------------
def none() -> FilterConfig:
    """Keep every crawled image: no rule, no dedup."""
    return FilterConfig(rules=RulesConfig.off(), dedup=DedupConfig(exact_image=False, exact_pair=False))


def basic() -> FilterConfig:
    """DataComp's basic filtering: English caption (fastText language ID), > 2 words and > 5 characters, shorter
    image side >= 200 px, aspect ratio <= 3. Nothing else."""
    return FilterConfig(rules=RulesConfig(max_caption_chars=0),
                        dedup=DedupConfig(exact_image=False, exact_pair=False))


def laion() -> FilterConfig:
    """LAION-400M/5B: English, alt-text >= 5 characters, (url, caption) dedup, CLIP ViT-B/32 cosine >= 0.28
    (needs --clip-checkpoint)."""
    return FilterConfig(rules=dataclasses.replace(RulesConfig.off(), languages=["en"], min_caption_chars=5),
                        clip=ClipScoreConfig(clip_mode="threshold", clip_threshold=0.28),
                        dedup=DedupConfig(exact_image=False, exact_pair=True))


def datacomp_clip() -> FilterConfig:
    """DataComp's CLIP-score filter: the top 30 % by CLIP score (needs --clip-checkpoint)."""
    return FilterConfig(rules=RulesConfig.off(), clip=ClipScoreConfig(clip_mode="top_fraction", clip_top_fraction=0.3),
                        dedup=DedupConfig(exact_image=False, exact_pair=False))


def demo() -> FilterConfig:
    """`basic` scaled to the sample web: 64-160 px glyphs; emoji names of one word ("rocket", >= 6 characters);
    another language dropped only when language ID is >= 50 % sure (lid.176 misreads many two-word names); exact
    and near-duplicate dedup; balancing over a small term list (pipeline/assets/demo_terms.txt) that caps "face",
    the one term over 150 in the 1,200 emoji."""
    return FilterConfig(rules=RulesConfig(min_caption_words=1, min_image_side=48, max_caption_chars=300,
                                          min_other_language_score=0.5),
                        dedup=DedupConfig(exact_image=True, exact_pair=True, near_dup=True, near_hamming=2),
                        balance=BalanceConfig(metadata_terms=DEMO_TERMS, per_term_cap=150, keep_unmatched=True))


PRESETS = {"default": FilterConfig, "none": none, "basic": basic, "laion": laion, "datacomp-clip": datacomp_clip,
           "demo": demo, "tiny": FilterConfig.tiny}


class FilterError(ValueError):
    """A usage error found when the run starts (no crawl, a step without what it needs)."""


def check(cfg: FilterConfig) -> None:
    if cfg.clip.clip_mode != "off" and not cfg.clip.clip_checkpoint:
        raise FilterError(f"CLIP-score filtering ({cfg.clip.clip_mode}) needs --clip-checkpoint")
    if cfg.dedup.semantic_dup and not (cfg.clip.clip_checkpoint and cfg.clip.clip_save_embeddings):
        raise FilterError("--semantic-dup needs the image embeddings: give --clip-checkpoint (and keep "
                          "--clip-save-embeddings)")
    if cfg.balance.enabled:
        from pipeline.balance import load_terms

        load_terms(cfg.balance.metadata_terms)  # a clear error now, not in every task
    if not Path(cfg.crawl_dir).is_dir():
        raise FilterError(f"crawl dir not found: {cfg.crawl_dir}")


# ---- the driver --------------------------------------------------------------------------------------------------
def _fingerprint(what: dict) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _features_fingerprint(cfg: FilterConfig) -> str:
    from pipeline.balance import terms_fingerprint

    b = cfg.balance
    terms = terms_fingerprint(b.metadata_terms, b.case_sensitive) if b.enabled else ""
    return _fingerprint({"rules": asdict(cfg.rules), "phash": cfg.dedup.near_dup, "terms": terms,
                              "require_images": cfg.require_images, "v": 1})


def _jobs(cfg: FilterConfig, ids: list[int], **extra):
    from pipeline.filter_part import PartJob

    b, fingerprint = cfg.balance, _features_fingerprint(cfg)  # once: it hashes the term list
    return [PartJob(shard_id=i, crawl_dir=os.path.abspath(cfg.crawl_dir), filter_dir=os.path.abspath(cfg.output_dir),
                    rules=asdict(cfg.rules), phash=cfg.dedup.near_dup,
                    terms=os.path.abspath(b.metadata_terms) if b.enabled else "", case_sensitive=b.case_sensitive,
                    require_images=cfg.require_images,
                    fingerprint=fingerprint, **extra) for i in ids]


def _run_parts(name: str, fn, jobs: list, cfg: FilterConfig, rows: int) -> tuple[dict, dict]:
    """One Ray task per part job -> ({shard_id: result}, {shard_id: failure cause})."""
    import ray

    task = ray.remote(fn).options(num_cpus=cfg.distribute.cpus_per_task, max_retries=0, scheduling_strategy="SPREAD")
    results: dict = {}
    progress = Progress(f"filter {name}", len(jobs), rows, cfg.distribute.progress_interval_s)

    def done(job, result):
        results[job.shard_id] = result
        progress.add(result["rows"], result["rows"])

    failures = run_tasks(jobs, lambda job, attempt: task.remote(job), cfg.distribute, done, progress)
    return results, {job.shard_id: cause for job, cause in failures.items()}


def _tidy(cfg: FilterConfig, ids: list[int]) -> None:
    """Withdraw the manifest, drop the last run's global work and the ledger parts of shards no longer crawled."""
    out = Path(cfg.output_dir)
    (out / FILTER_MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / WORK_DIR / "global", ignore_errors=True)
    keep = {f"{part_name(i)}.parquet" for i in ids}
    for d in (ledger_dir(out), out / WORK_DIR / "features", out / WORK_DIR / "scores"):
        for p in d.glob("*.parquet") if d.is_dir() else ():
            if p.name not in keep:
                p.unlink()
    for p in ledger_dir(out).glob(".*") if ledger_dir(out).is_dir() else ():
        p.unlink()  # temp files of a killed writer


def _score(cfg: FilterConfig, ids: list[int]) -> dict:
    from pipeline.clipscore import ScoreJob, score_parts
    from pipeline.filter_part import features_path
    from trainer.clip.formats.crawl import crawl_shard

    jobs = [ScoreJob(i, str(crawl_shard(os.path.abspath(cfg.crawl_dir), i).tar),
                     str(features_path(os.path.abspath(cfg.output_dir), i))) for i in ids]
    return score_parts(cfg.clip, os.path.abspath(cfg.output_dir), jobs, cfg.distribute)


def run(cfg: FilterConfig) -> dict:
    from pipeline.common import init_ray
    from pipeline.filter_global import run_global
    from pipeline.filter_part import assemble, features

    check(cfg)
    shards = complete_shards(cfg.crawl_dir)
    ids, rows = [s.id for s in shards], sum(int((read_marker(s.stats) or {}).get("count", 0)) for s in shards)
    if not ids:
        raise FilterError(f"no complete crawl shards (NNNNN_stats.json + .parquet) in {cfg.crawl_dir!r}")
    t0, timings = time.time(), {}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _tidy(cfg, ids)
    init_ray(cfg.distribute.ray_address)
    feats, failed = _run_parts("features", features, _jobs(cfg, ids), cfg, rows)
    timings["features"] = round(time.time() - t0, 2)
    ok_ids = sorted(feats)
    scored = _score(cfg, ok_ids) if cfg.clip.clip_checkpoint else None
    if scored:
        failed.update(scored.get("failed", {}))
        ok_ids = [i for i in ok_ids if i not in scored.get("failed", {})]
    if scored:
        timings["clip_score"] = round(time.time() - t0 - sum(timings.values()), 2)
    steps = run_global(cfg, ok_ids)
    timings.update({f"global_{k}": v["seconds"] for k, v in steps.items()})
    t1 = time.time()
    drops = tuple(v["drops"] for v in steps.values() if v.get("drops"))
    clusters = steps.get("semantic_duplicate", {}).get("clusters", "")
    parts, more_failed = _run_parts("ledger", assemble, _jobs(cfg, ok_ids, drops=drops, clusters=clusters), cfg,
                                    sum(feats[i]["rows"] for i in ok_ids))
    failed.update(more_failed)
    timings["assemble"] = round(time.time() - t1, 2)
    return _manifest(cfg, ids, parts, failed, feats, scored, steps, timings, time.time() - t0)


def _manifest(cfg, ids, parts, failed, feats, scored, steps, timings, seconds) -> dict:
    dropped = {r: sum(p["dropped"].get(r, 0) for p in parts.values()) for r in REASONS}
    rows = sum(p["rows"] for p in parts.values())
    worker_rss = max([r.get("peak_rss", 0) for r in (*feats.values(), *parts.values())] or [0])
    what = {"cfg": asdict(cfg.rules), "clip": asdict(cfg.clip), "dedup": asdict(cfg.dedup),
            "balance": asdict(cfg.balance), "crawl": os.path.abspath(cfg.crawl_dir), "parts": sorted(parts)}
    m = {"config": asdict(cfg), "crawl_dir": os.path.abspath(cfg.crawl_dir), "fingerprint": _fingerprint(what),
         "input_rows": rows, "kept": sum(p["kept"] for p in parts.values()), "dropped": dropped,
         "parts": [{"part": part_name(i), "rows": parts[i]["rows"], "kept": parts[i]["kept"],
                    "node_features": feats[i].get("node", ""), "node_ledger": parts[i].get("node", "")}
                   for i in sorted(parts)],
         "failed": {part_name(i): c for i, c in sorted(failed.items())}, "complete": not failed,
         "embeddings": bool(scored), "clip_score": {k: v for k, v in (scored or {}).items() if k != "failed"},
         "steps": {k: {x: y for x, y in v.items() if x not in ("drops", "clusters")} for k, v in steps.items()},
         "reused_features": sum(bool(f.get("reused")) for f in feats.values()),
         "timings_s": timings, "seconds": round(seconds, 2),
         "rows_per_s": round(rows / max(seconds, 1e-9), 1),
         "peak_rss_mb": {"driver": round(peak_rss_bytes() / 2**20), "worker_max": round(worker_rss / 2**20)}}
    return write_filter_manifest(cfg.output_dir, m)


def report(m: dict, output_dir: str) -> int:
    dropped = ", ".join(f"{k} {v}" for k, v in m["dropped"].items() if v)
    print(f"filter: kept {m['kept']}/{m['input_rows']} (dropped: {dropped or 'none'}) in {m['seconds']} s "
          f"-> {output_dir}/ledger/", flush=True)
    for name, step in m["steps"].items():
        print(f"  {name}: {step.get('dropped', 0)} dropped ({step['seconds']} s)", flush=True)
    if m["failed"]:
        print(f"filter: {len(m['failed'])} shard(s) failed every attempt: {', '.join(m['failed'])}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    cli = CLI(FilterConfig, prog="clipforge filter", description=__doc__.split("\n")[0], presets=PRESETS,
              config_file=True)
    return run_main(cli, argv, lambda cfg: report(run(cfg), cfg.output_dir), (FilterError, LedgerError, ValueError),
                    prefix="filter")


if __name__ == "__main__":
    raise SystemExit(main())
