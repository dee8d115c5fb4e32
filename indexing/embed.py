"""`clipforge embed`: a shard dir's images and captions -> an embedding dir, on a Ray actor pool or in this process.

The embedding dir is trainer.clip.formats.embeddings' contract; one model per Ray actor (one GPU each when the
cluster has GPUs), or one in this process with --executor local.

    python -m indexing.embed SHARDS_DIR --checkpoint CKPT --out EMBED_DIR [--batch-size 256] [--dtype float16]
        [--executor ray|local] [--actors 0] [--cpus-per-actor 1] [--device auto|cpu|cuda] [--no-captions]
        [--filter-dir FILTER_DIR | --no-reuse] [DistributeConfig options: --max-shard-retry, --ray-address, ...]

Reads  SHARDS_DIR through trainer.clip.formats.shards.list_shards (clipforge manifest, img2dataset dir or plain
       *.tar): part id = the shard's position in that listing; each tar and its sidecar parquet (indexing.
       embed_part); any checkpoint trainer.clip.checkpoint.load_pretrained reads. With reuse on (the default),
       the filter dir recorded in SHARDS_DIR/manifest.json (source.filter_dir, or --filter-dir): its
       emb/info.json, filter_manifest.json, the ledger parts' key / part_row and the emb/*.npy rows they index.
Writes EMBED_DIR/emb/img|txt-XXXXX.npy and meta/XXXXX.parquet per part (embed_part), then EMBED_DIR/embed.json
       (written last: readers trust only the parts it lists; it also records the parts that failed, with their
       cause, and how many rows came from the filter's embeddings). Scratch: EMBED_DIR/_clipforge/ (the reuse
       lookup and DuckDB's spill files), removed at the end.

Filter reuse: when the filter's embeddings were made by the same weights (sha256 of the weights file), DuckDB
(out of core: --memory-limit, spilling to _clipforge/tmp) joins the pending shards' sidecar keys with the ledger's
key / part_row once per run and writes the result partitioned by part id; each part then copies its rows' vectors
from the filter's npy files instead of running the model, and encodes only the rest. A shard without a sidecar
parquet (plain tars) is always encoded.

Rerun: embed.json is removed first; parts the shard listing no longer has (and temp files of killed writers) are
deleted; a part whose meta parquet records the same weights, dtype, captions setting and input fingerprint (tar
path + size, sidecar size), with npy files of the right shape, is skipped (no model load, no Ray actor for it);
every other part is recomputed. So an interrupted run, rerun, completes the dir with every part exactly once.
Exit code: 0, 1 when parts failed (missing / corrupt tars, parts that failed every retry), 2 on a usage error.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from indexing.embed_part import PartEmbedder, PartJob, PartSettings, part_done, summary, wanted
from raykit.actors import DEVICES, failure_cause
from raykit.config import DistributeConfig
from trainer.clip.flags import CLI, opt, require, run_main, section
from trainer.clip.formats.atomic import read_json
from trainer.clip.formats.embeddings import (EMB_SUBDIR, EMBED_DTYPES, EMBED_MANIFEST, META_SUBDIR,
                                             write_embed_manifest)
from trainer.clip.formats.ledger import EMB_DIR, LedgerError, ledger_files, read_filter_manifest
from trainer.clip.formats.shards import ShardDir, list_shards

EXECUTORS = ("ray", "local")
WORK_DIR, LOOKUP_DIR, TMP_DIR = "_clipforge", "reuse", "tmp"
PART_FILE = re.compile(r"(?:img-|txt-)?(\d{5,})\.(?:npy|parquet)")
LEDGER_PART = re.compile(r"part-(\d+)\.parquet")


@dataclass
class EmbedConfig:
    """What is embedded, with which model, where it is written and where the work runs."""
    shards_dir: str = opt("", positional=True, help="SHARDS_DIR: clipforge shards (manifest.json), an img2dataset "
                                                    "output dir or a dir of *.tar")
    checkpoint: str = opt("", required=True, help="CLIP checkpoint: a clipforge dir or an OpenAI / open_clip / HF "
                                                  "weights file or dir")
    out: str = opt("", required=True, help="EMBED_DIR to write")
    batch_size: int = opt(256, help="images per forward pass")
    dtype: str = opt("float16", choices=EMBED_DTYPES, help="dtype of the stored embeddings")
    executor: str = opt("ray", choices=EXECUTORS, help="ray: a Ray actor pool; local: every part in this process")
    actors: int = opt(0, help="Ray actors (0: one per GPU when the cluster has GPUs, else the cluster's CPUs // "
                              "--cpus-per-actor)")
    cpus_per_actor: float = opt(1.0, help="CPUs per actor (local: of this process): torch threads and "
                                          "image-decode threads")
    device: str = opt("auto", choices=DEVICES, help="auto: CUDA when there are GPUs (the Ray cluster's, or this "
                                                    "machine's with --executor local), else CPU")
    captions: bool = opt(True, help="embed the captions too (--no-captions: txt-*.npy rows are zero)")
    filter_dir: str = opt("", help="FILTER_DIR whose embeddings are reused (default: source.filter_dir of "
                                   "SHARDS_DIR/manifest.json)")
    reuse: bool = opt(True, help="take a row's embeddings from the filter dir when the same weights made them "
                                 "(--no-reuse: encode every row)")
    memory_limit: str = opt("2GB", help="DuckDB's memory limit for the reuse lookup (it spills to "
                                        "EMBED_DIR/_clipforge/tmp beyond it)")
    distribute: DistributeConfig = section(DistributeConfig)

    def __post_init__(self):
        require(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        require(self, "dtype", self.dtype in EMBED_DTYPES, f"must be one of {', '.join(EMBED_DTYPES)}")
        require(self, "executor", self.executor in EXECUTORS, f"must be one of {', '.join(EXECUTORS)}")
        require(self, "actors", self.actors >= 0, "must be >= 0")
        require(self, "cpus_per_actor", self.cpus_per_actor > 0, "must be > 0")
        require(self, "device", self.device in DEVICES, f"must be one of {', '.join(DEVICES)}")
        require(self, "memory_limit", re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", self.memory_limit.strip(), re.I)
                is not None, "must be a size such as 512MB or 4GB")

    @classmethod
    def tiny(cls, shards_dir: str = "", checkpoint: str = "", out: str = "", **kw) -> "EmbedConfig":
        """Tests and laptops: small batches, in this process, no retry delays, no progress lines."""
        kw = {"batch_size": 8, "executor": "local", "memory_limit": "256MB",
              "distribute": DistributeConfig(retry_backoff_s=0.0, progress_interval_s=0.0), **kw}
        return cls(shards_dir=str(shards_dir), checkpoint=str(checkpoint), out=str(out), **kw)


# ------------------------------------------------------------------------------------------------ the plan
def plan_jobs(shard_dir: ShardDir) -> tuple[list[PartJob], dict]:
    """One job per listed shard whose tar exists; -> (jobs, {part id: cause} of the listed tars that do not)."""
    entries = (shard_dir.manifest or {}).get("shards") or [{} for _ in shard_dir.shards]
    root, jobs, missing = shard_dir.root.resolve(), [], {}
    for i, (shard, entry) in enumerate(zip(shard_dir.shards, entries)):
        rel = shard.tar.relative_to(root).as_posix() if shard.tar.is_relative_to(root) else str(shard.tar)
        if not shard.exists:
            missing[i] = {"shard": rel, "type": "FileNotFoundError", "error": f"{shard.tar} does not exist",
                          "attempts": 0}
            continue
        side = shard_dir.root / entry["parquet"] if entry.get("parquet") else shard.tar.with_suffix(".parquet")
        jobs.append(PartJob(i, str(shard.tar), rel, str(side.resolve()) if side.is_file() else ""))
    return jobs, missing


def tidy(out: Path, n_parts: int) -> int:
    """Withdraw embed.json, delete parts the listing no longer has and temp files; -> files removed."""
    (out / EMBED_MANIFEST).unlink(missing_ok=True)  # readers must not trust the dir from here on
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    removed = 0
    for sub in (EMB_SUBDIR, META_SUBDIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for p in (out / sub).iterdir():
            m = PART_FILE.fullmatch(p.name)
            if (m and int(m.group(1)) >= n_parts) or (p.name.startswith(".") and p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def done_parts(out: Path, jobs: list[PartJob], settings: PartSettings) -> dict:
    """{part id: result} of the parts already complete with this run's settings (footers read by threads)."""
    def check(job: PartJob):
        try:
            info = part_done(out, job, wanted(settings, job))
        except OSError:
            return None
        return None if info is None else {**summary(job, info), "skipped": True, "seconds": 0.0}

    with ThreadPoolExecutor(16) as pool:
        return {r["id"]: r for r in pool.map(check, jobs) if r is not None}


# ------------------------------------------------------------------------------------------------ filter reuse
def plan_reuse(cfg: EmbedConfig, shard_dir: ShardDir, sha: str) -> tuple[dict, list[str]]:
    """-> ({"used", "filter_dir", "why"?, "dim"?}, the ledger files to join). ValueError when an explicit
    --filter-dir is not a directory; any other reason not to reuse is recorded in "why"."""
    source = ((shard_dir.manifest or {}).get("source") or {}) if isinstance(shard_dir.manifest, dict) else {}
    filter_dir = cfg.filter_dir or (source.get("filter_dir") if isinstance(source, dict) else "") or ""
    if not cfg.reuse:
        return {"used": False, "filter_dir": filter_dir, "why": "--no-reuse"}, []
    if not filter_dir:
        return {"used": False, "filter_dir": "", "why": "no filter dir (none in SHARDS_DIR/manifest.json)"}, []
    if cfg.filter_dir and not os.path.isdir(cfg.filter_dir):
        raise ValueError(f"--filter-dir {cfg.filter_dir}: not a directory")
    filter_dir = os.path.abspath(filter_dir)
    out = {"used": False, "filter_dir": filter_dir}
    try:
        info = read_json(Path(filter_dir) / EMB_DIR / "info.json")
        files = [str(p) for p in ledger_files(filter_dir, read_filter_manifest(filter_dir)) if p.is_file()]
        dim = int(info["dim"])
    except (OSError, ValueError, KeyError, TypeError, LedgerError) as e:
        return {**out, "why": f"no readable filter embeddings ({type(e).__name__}: {e})"}, []
    if info.get("weights_sha256") != sha:
        return {**out, "why": "the filter's embeddings were made by other weights"}, []
    if not files:
        return {**out, "why": "the filter manifest lists no ledger part on disk"}, []
    return {"used": True, "filter_dir": filter_dir, "dim": dim}, files


def _sql_list(paths) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def build_lookup(work: Path, jobs: list[PartJob], ledger: list[str], memory_limit: str) -> list[PartJob]:
    """The key -> (ledger part, part_row) rows of every job with a sidecar, written by DuckDB partitioned by part
    id (work/reuse/part_id=N/); -> the jobs, each pointing at its partition."""
    import duckdb
    import pyarrow as pa

    with_side = [j for j in jobs if j.sidecar]
    parts = [(f, int(m.group(1))) for f in ledger if (m := LEDGER_PART.fullmatch(Path(f).name))]
    if not with_side or not parts:
        return jobs
    (work / TMP_DIR).mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(work / TMP_DIR),
                                 "preserve_insertion_order": False})
    try:
        con.register("sidecars", pa.table({"file": [j.sidecar for j in with_side],
                                           "part_id": [j.id for j in with_side]}))
        con.register("ledgers", pa.table({"file": [f for f, _ in parts], "ledger_part": [p for _, p in parts]}))
        con.execute(f"""
            COPY (SELECT s.part_id, l.key, l.ledger_part, l.part_row
                  FROM (SELECT f.part_id, r.key
                        FROM read_parquet({_sql_list(j.sidecar for j in with_side)}, filename=true,
                                          union_by_name=true) r JOIN sidecars f ON r.filename = f.file) s
                  JOIN (SELECT f.ledger_part, r.key, r.part_row
                        FROM read_parquet({_sql_list(f for f, _ in parts)}, filename=true, union_by_name=true) r
                        JOIN ledgers f ON r.filename = f.file
                        WHERE r.key IS NOT NULL AND r.part_row IS NOT NULL) l ON s.key = l.key)
            TO '{work / LOOKUP_DIR}' (FORMAT parquet, PARTITION_BY (part_id))""")
    finally:
        con.close()
    return [dataclasses.replace(j, lookup=str(work / LOOKUP_DIR / f"part_id={j.id}")) if j.sidecar else j
            for j in jobs]


# ------------------------------------------------------------------------------------------------ executors
def _local_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA device")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def run_local(cfg: EmbedConfig, settings: PartSettings, out: Path, jobs: list[PartJob]) -> tuple[dict, dict, int]:
    """Every job in this process, one after the other (torch's thread count is restored afterwards)."""
    import torch

    if not jobs:
        return {}, {}, 0
    threads = torch.get_num_threads()
    worker = PartEmbedder(settings, int(cfg.cpus_per_actor), _local_device(cfg.device))
    results, failed = {}, {}
    try:
        for job in jobs:
            try:
                results[job.id] = worker.embed(str(out), job)
            except Exception as e:  # noqa: BLE001 -- a failed part is reported, the others still run
                failed[job.id] = failure_cause(e, 1)
    finally:
        worker.close()
        torch.set_num_threads(threads)
    return results, failed, 1


def run_ray(cfg: EmbedConfig, settings: PartSettings, out: Path, jobs: list[PartJob]) -> tuple[dict, dict, int]:
    """Every job on a Ray actor pool (raykit.actors): retried, dead actors replaced, stragglers killed."""
    from raykit.actors import actor_plan, run_actors
    from raykit.cluster import init_ray

    if not jobs:
        return {}, {}, 0
    init_ray(cfg.distribute.ray_address)
    n, gpu = actor_plan(len(jobs), cfg.actors, cfg.cpus_per_actor, cfg.device, "--", "embed")
    results, failed = run_actors(PartEmbedder, (settings, int(cfg.cpus_per_actor), "cuda" if gpu else "cpu"), jobs,
                                 cfg.distribute, method="embed", args=(str(out),), n_actors=n, gpu=gpu,
                                 cpus_per_actor=cfg.cpus_per_actor, label=lambda job: job.id, name="embed",
                                 count=lambda r: r.get("encoded", 0) if not r.get("skipped") else 0, verb="embedded")
    return results, failed, n


# ------------------------------------------------------------------------------------------------ the driver
def _absolute(cfg: EmbedConfig) -> EmbedConfig:
    for name in ("shards_dir", "checkpoint", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"{'SHARDS_DIR' if name == 'shards_dir' else '--' + name} is required")
    return dataclasses.replace(cfg, shards_dir=os.path.abspath(cfg.shards_dir),
                               checkpoint=os.path.abspath(cfg.checkpoint), out=os.path.abspath(cfg.out))


def run(cfg: EmbedConfig) -> dict:
    """Embed (or skip) every part, then write embed.json. -> the manifest (with a "run" section of this run's
    counts). ValueError for a missing shard dir, an empty one, or a missing checkpoint."""
    from trainer.clip.checkpoint import weights_sha256

    t0, cfg = time.monotonic(), _absolute(cfg)
    shard_dir = list_shards(cfg.shards_dir)
    if not shard_dir.shards:
        raise ValueError(f"no shards in {cfg.shards_dir}")
    sha, out = weights_sha256(cfg.checkpoint), Path(cfg.out)
    removed = tidy(out, len(shard_dir.shards))
    jobs, failed = plan_jobs(shard_dir)
    settings = PartSettings(cfg.checkpoint, sha, cfg.dtype, cfg.batch_size, cfg.captions)
    results = done_parts(out, jobs, settings)
    pending = [j for j in jobs if j.id not in results]
    reuse, ledger = plan_reuse(cfg, shard_dir, sha) if pending else ({"used": False, "why": "nothing to do"}, [])
    if reuse["used"]:
        pending = build_lookup(out / WORK_DIR, pending, ledger, cfg.memory_limit)
        settings = dataclasses.replace(settings, filter_dir=reuse["filter_dir"], reuse_dim=reuse["dim"])
    print(f"embed: {len(shard_dir.shards)} parts ({len(results)} already done, {len(failed)} missing, "
          f"{removed} stale files removed); filter reuse: {'on' if reuse['used'] else reuse.get('why')}",
          file=sys.stderr, flush=True)
    try:
        ran, raised, actors = (run_ray if cfg.executor == "ray" else run_local)(cfg, settings, out, pending)
    finally:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    shard_of = {j.id: j.shard for j in jobs}
    failed.update({i: {"shard": shard_of[i], **c} for i, c in raised.items()})
    for i, r in ran.items():
        if "failed" in r:
            failed[i] = {"shard": r["shard"], **r["failed"]}
        else:
            results[i] = r
    return write_manifest(cfg, sha, reuse, results, failed, actors, time.monotonic() - t0)


def write_manifest(cfg: EmbedConfig, sha: str, reuse: dict, results: dict, failed: dict, actors: int,
                   seconds: float) -> dict:
    parts = [results[i] for i in sorted(results)]
    computed = [r for r in parts if not r["skipped"]]
    encoded = sum(r["encoded"] for r in computed)
    return write_embed_manifest(cfg.out, {
        "checkpoint": cfg.checkpoint, "weights_sha256": sha, "dim": next((r["dim"] for r in parts), None),
        "dtype": cfg.dtype, "shards_dir": cfg.shards_dir, "captions": cfg.captions,
        "num_rows": sum(r["rows"] for r in parts), "num_embedded": sum(r["embedded"] for r in parts),
        "reused_rows": sum(r["reused"] for r in parts),
        "not_embedded": {"no_image": sum(r["no_image"] for r in parts),
                         "decode_failed": sum(r["decode_failed"] for r in parts)},
        "parts": [{k: r[k] for k in ("id", "shard", "rows", "embedded", "reused")} for r in parts],
        "failed": {str(i): failed[i] for i in sorted(failed)},
        "reuse": reuse,
        "run": {"executor": cfg.executor, "actors": actors, "parts_skipped": len(parts) - len(computed),
                "parts_computed": len(computed), "rows_encoded": encoded,
                "rows_reused": sum(r["reused"] for r in computed), "seconds": round(seconds, 3),
                "images_per_s": round(encoded / seconds, 1) if seconds > 0 else 0.0},
    })


def report(m: dict) -> int:
    """Print the outcome. -> 1 if parts failed, else 0."""
    run_ = m["run"]
    print(f"embed: {m['num_embedded']}/{m['num_rows']} rows embedded in {len(m['parts'])} parts "
          f"({run_['parts_skipped']} already done; {run_['rows_encoded']} rows encoded, {run_['rows_reused']} "
          f"taken from the filter, {m['not_embedded']['no_image']} without an image, "
          f"{m['not_embedded']['decode_failed']} did not decode) in {run_['seconds']:.1f} s", flush=True)
    for i, cause in list(m["failed"].items())[:10]:
        print(f"embed: FAILED part {i} ({cause['shard']}): {cause['type']}: {cause['error']}", file=sys.stderr)
    if m["failed"]:
        print(f"embed: {len(m['failed'])} parts failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    cli = CLI(EmbedConfig, prog="clipforge embed", description=__doc__.split("\n")[0],
              presets={"default": EmbedConfig, "tiny": EmbedConfig.tiny})
    return run_main(cli, argv, lambda cfg: report(run(cfg)), (ValueError, FileNotFoundError), prefix="embed")


if __name__ == "__main__":
    raise SystemExit(main())
