"""Stage 3 — shard: the filter's kept samples, globally shuffled, into equal training shards (WebDataset .tar +
Parquet sidecar + manifest), on Ray.

Reads  FILTER_DIR/filter_manifest.json and the ledger parts it lists (trainer.clip.formats.ledger): the `keep`
       rows, and for each its crawl tar (`shard`), `image_ext`, `image_offset`, `image_size`; the image bytes from
       CRAWL_DIR/<shard> by seek + read (never re-encoded).
Writes SHARDS_DIR/_clipforge/plan/shard-XXXXX.parquet  the planned rows of each output shard, in order; plan.json
                                       (plan_id, per-shard row counts and keys_sha256) after them
       SHARDS_DIR/shard-XXXXX.tar      per sample KEY.<ext> (the crawled bytes), KEY.txt, KEY.json (the sidecar row)
       SHARDS_DIR/shard-XXXXX.parquet  one row per sample in tar order (SAMPLE_SCHEMA + the carried input columns);
                                       the shard's completion marker, written last: its schema metadata records the
                                       planned keys' sha256, the tar's size and sha256, the missing rows
       SHARDS_DIR/manifest.json        clipforge.shards.v1 (trainer.clip.formats.shards) plus per shard bytes,
                                       sha256, keys_sha256, and plan_id, seed, missing, failed_shards: written last
       SHARDS_DIR/_clipforge/tmp/      DuckDB's spill files while planning (removed at the end)

The plan: DuckDB (out of core: --memory-limit, spilling to _clipforge/tmp) orders the kept rows by
md5_number_lower(SEED:KEY) and streams them, in that order, to the driver, which cuts them into
S = ceil(N / samples_per_shard) consecutive runs whose sizes differ by at most one, one plan file each, hashing
each run's keys on the way (sha256 of "KEY\\n" per key, in order). The driver holds one batch at a time, never the
rows. plan_id = sha256 of (the filter fingerprint, seed, samples_per_shard, the per-shard key hashes).

One Ray task per output shard (pipeline.distribute: bounded, retried, failures reported): it reads its plan file,
reads the images grouped by crawl tar in ascending offset order into a local spool, then writes the tar in plan
order (mtime 0, its sha256 computed while writing) and the sidecar, each atomically. A kept row whose image cannot
be read (no image, crawl tar missing, offset past the end, short read) is dropped from its shard and counted as
missing by reason, never a crash.

A rerun first withdraws manifest.json (once the filter dir is known to be readable), replans, deletes shard files
the plan does not list and temp files, and reuses a shard only if its sidecar records the plan's keys hash and its
tar has the recorded size (a task deletes the old sidecar before it rewrites a tar). So a killed run, rerun, gives
the same bytes in every tar and the same manifest (but `resumed_shards`) as an uninterrupted one, every kept
sample exactly once; a shard of an earlier plan is never reused. Shards that fail every retry are listed in the
manifest's failed_shards (complete: false) and the exit code is 1.

    python -m pipeline.shard /data/filtered /data/shards --samples-per-shard 10000 --seed 0
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.common import duckdb_connect, init_ray, ray_node_id
from pipeline.distribute import DistributeConfig, Progress, run_tasks
from trainer.clip.flags import CLI, opt, require, run_main, section
from trainer.clip.formats.atomic import atomic_write, atomic_write_json
from trainer.clip.formats.ledger import LEDGER_COLUMNS, ledger_files, read_filter_manifest
from trainer.clip.formats.shards import (IMAGE_EXTS, MANIFEST, SAMPLE_SCHEMA, shard_name, split_member,
                                         write_manifest, write_tar)

WORK_DIR, PLAN_DIR, TMP_DIR, PLAN_JSON = "_clipforge", "plan", "tmp", "plan.json"
MARKER = b"clipforge.shard"  # the sidecar's schema metadata key: JSON of the shard's record
FAULT_ENV = "CLIPFORGE_SHARD_FAULT"  # tests: "raise:I,J" fails shards I and J, "sleep:S" slows every task
# the ledger columns a plan carries: where the image is, and the sample's own columns
IMAGE_COLUMNS = ("shard", "image_ext", "image_offset", "image_size")
BATCH_ROWS = 32_768
SHARD_FILE = re.compile(r"shard-\d{5,}\.(tar|parquet)")


@dataclass
class ShardConfig:
    """What is sharded, how it is shuffled and cut, and where the work runs."""
    filter_dir: str = opt("", positional=True, help="FILTER_DIR: filter_manifest.json + ledger/")
    output_dir: str = opt("", positional=True, help="SHARDS_DIR to write")
    crawl_dir: str = opt("", help="the crawl dir (default: the one recorded by the filter stage)")
    samples_per_shard: int = opt(10_000, help="most samples per output shard (sizes differ by at most one)")
    seed: int = opt(0, help="the global shuffle: kept rows are ordered by md5(SEED:KEY)")
    memory_limit: str = opt("4GB", help="DuckDB's memory limit while planning (it spills to "
                                        "SHARDS_DIR/_clipforge/tmp beyond it)")
    distribute: DistributeConfig = section(DistributeConfig)

    def __post_init__(self):
        require(self, "samples_per_shard", self.samples_per_shard >= 1, "must be >= 1")
        require(self, "memory_limit", re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", self.memory_limit.strip(), re.I)
                is not None, "must be a size such as 512MB or 4GB")

    @classmethod
    def tiny(cls, filter_dir: str = "", output_dir: str = "") -> "ShardConfig":
        return cls(filter_dir=filter_dir, output_dir=output_dir, samples_per_shard=64, memory_limit="512MB")


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    plan_id: str
    num_samples: int  # kept rows planned
    sizes: list[int]  # planned rows per output shard
    digests: list[str]  # keys_sha256 per output shard
    null_keys: int  # kept rows without a key (cannot be written; counted, not planned)


def shard_sizes(n: int, samples_per_shard: int) -> list[int]:
    """S = ceil(n / samples_per_shard) sizes that differ by at most one and sum to n."""
    s = -(-n // samples_per_shard)
    return [n // s + (1 if i < n % s else 0) for i in range(s)] if n else []


def keys_digest(keys) -> str:
    """sha256 of the keys in order, each followed by a newline: a shard's planned keys hash."""
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{k}\n".encode())
    return h.hexdigest()


def plan_id(fingerprint, seed: int, samples_per_shard: int, digests: list[str]) -> str:
    body = {"fingerprint": fingerprint, "seed": seed, "samples_per_shard": samples_per_shard, "keys": digests}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(cfg: ShardConfig, tmp: Path):
    con = duckdb_connect(":memory:", cfg.memory_limit, str(tmp))
    con.execute("SET preserve_insertion_order = true")  # the plan's order is the shuffle
    return con


def plan_columns(con, files: list[str]) -> list[str]:
    """The plan's columns: the sample's, where its image is, then the crawl's carried input columns."""
    names = [r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet($files, union_by_name=true)",
                                       {"files": files}).fetchall()]
    own = ["key", *IMAGE_COLUMNS, *(n for n in SAMPLE_SCHEMA.names if n != "key")]
    return own + [n for n in names if n not in LEDGER_COLUMNS]


class _PlanWriter:
    """Cuts the ordered stream of kept rows into the per-shard plan files, hashing each shard's keys."""

    def __init__(self, plan_dir: Path, sizes: list[int]):
        self.dir, self.sizes, self.digests = plan_dir, sizes, []
        self.pending: list[pa.RecordBatch] = []
        self.rows, self.last_key = 0, None

    def add(self, batch: pa.RecordBatch) -> None:
        self._check_unique(batch.column(0))
        while batch.num_rows:
            if len(self.digests) == len(self.sizes):
                raise ValueError("the ledger changed while it was being planned: rerun")
            take = min(batch.num_rows, self.sizes[len(self.digests)] - self.rows)
            self.pending.append(batch.slice(0, take))
            self.rows, batch = self.rows + take, batch.slice(take)
            if self.rows == self.sizes[len(self.digests)]:
                self._flush()

    def _check_unique(self, keys: pa.Array) -> None:
        """The same key sorts next to itself (same hash): a kept key twice is a broken ledger."""
        n = len(keys)
        dup = pc.equal(keys.slice(1), keys.slice(0, n - 1)) if n > 1 else pa.array([], pa.bool_())
        if (n and self.last_key is not None and keys[0].as_py() == self.last_key) or pc.any(dup).as_py():
            raise ValueError("the ledger keeps a key more than once (re-run the filter)")
        self.last_key = keys[n - 1].as_py() if n else self.last_key

    def _flush(self) -> None:
        table = pa.Table.from_batches(self.pending)
        self.digests.append(keys_digest(table.column("key").to_pylist()))
        path = self.dir / f"{shard_name(len(self.digests) - 1)}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(table, tmp), durable=False)
        self.pending, self.rows = [], 0


def make_plan(cfg: ShardConfig, files: list[str], fingerprint, work: Path) -> Plan:
    """Order the kept rows out of core and write the per-shard plan files + plan.json (last)."""
    import duckdb

    plan_dir = work / PLAN_DIR
    shutil.rmtree(plan_dir, ignore_errors=True)
    plan_dir.mkdir(parents=True)
    con = _connect(cfg, work / TMP_DIR)
    try:
        source = "read_parquet($files, union_by_name=true)"
        n, null_keys = con.execute(f"SELECT count(key), count(*) - count(key) FROM {source} WHERE keep",
                                   {"files": files}).fetchone()
        if not n:
            raise ValueError(f"no kept samples in the ledger of {cfg.filter_dir}")
        writer = _PlanWriter(plan_dir, shard_sizes(n, cfg.samples_per_shard))
        cols = ", ".join(_quote(c) for c in plan_columns(con, files))
        rel = con.sql(f"SELECT {cols} FROM {source} WHERE keep AND key IS NOT NULL "
                      "ORDER BY md5_number_lower($seed || ':' || key), key",
                      params={"files": files, "seed": str(cfg.seed)})
        for batch in rel.to_arrow_reader(BATCH_ROWS):
            writer.add(batch)
        if len(writer.digests) != len(writer.sizes):
            raise ValueError("the ledger changed while it was being planned: rerun")
    except duckdb.Error as e:  # unreadable parts, columns of conflicting types, a memory limit DuckDB refuses
        raise ValueError(f"planning failed on the ledger of {cfg.filter_dir}: {e}") from e
    finally:
        con.close()
    plan = Plan(plan_id(fingerprint, cfg.seed, cfg.samples_per_shard, writer.digests), n, writer.sizes,
                writer.digests, null_keys)
    atomic_write_json(plan_dir / PLAN_JSON, asdict(plan), durable=False)
    return plan


# ------------------------------------------------------------------------------------------------ shard task
@dataclass(frozen=True)
class ShardJob:
    index: int
    rows: int  # planned rows
    keys_sha256: str
    plan_file: str
    output_dir: str
    crawl_dir: str
    attempt: int = 1


def _fault(job: ShardJob) -> None:
    kind, _, arg = os.environ.get(FAULT_ENV, "").partition(":")
    if kind == "raise" and str(job.index) in arg.split(","):
        raise RuntimeError(f"injected failure in shard {job.index}")
    if kind == "sleep":
        time.sleep(float(arg))


def _paths(job: ShardJob) -> tuple[Path, Path]:
    out = Path(job.output_dir) / shard_name(job.index)
    return out.with_suffix(".tar"), out.with_suffix(".parquet")


def _entry(job: ShardJob, record: dict, resumed: bool) -> dict:
    tar, sidecar = _paths(job)
    return {"index": job.index, "tar": tar.name, "parquet": sidecar.name, **record, "resumed": resumed,
            "node": ray_node_id()}


def _reusable(job: ShardJob) -> dict | None:
    """The sidecar's record if the shard on disk is this plan's (keys hash) and its tar has the recorded size."""
    tar, sidecar = _paths(job)
    try:
        record = json.loads(pq.read_schema(sidecar).metadata[MARKER])
        ok = record["keys_sha256"] == job.keys_sha256 and tar.stat().st_size == record["bytes"]
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None
    return record if ok else None


def _unusable(r: dict) -> str | None:
    """Why a planned row cannot have an image member, or None."""
    src, ext, off, size = (r[c] for c in IMAGE_COLUMNS)
    if None in (src, ext, off, size) or off < 0 or size < 0:
        return "no_image"
    if PurePosixPath(src).is_absolute() or ".." in PurePosixPath(src).parts:
        return "bad_source"
    if ext.lower() not in IMAGE_EXTS or split_member(f"{r['key']}.{ext}") != (r["key"], ext.lower()):
        return "bad_member"
    return None


def gather_images(rows: list[dict], crawl_dir: str, spool) -> tuple[dict[int, tuple[int, int]], Counter]:
    """Copy the rows' image bytes into `spool`, one crawl tar at a time, offsets ascending.
    -> ({row index: (spool offset, size)}, missing rows by reason)."""
    where, missing, by_src = {}, Counter(), defaultdict(list)
    for i, r in enumerate(rows):
        reason = _unusable(r)
        if reason:
            missing[reason] += 1
        else:
            by_src[r["shard"]].append(i)
    for src in sorted(by_src):
        todo = sorted(by_src[src], key=lambda i: rows[i]["image_offset"])
        try:
            f = open(os.path.join(crawl_dir, src), "rb")
        except OSError:
            missing["source_missing"] += len(todo)
            continue
        with f:
            end = os.fstat(f.fileno()).st_size
            for i in todo:
                off, size = rows[i]["image_offset"], rows[i]["image_size"]
                try:
                    f.seek(off)
                    data = f.read(size) if off + size <= end else b""
                except OSError:
                    data = None
                if data is None or len(data) != size:
                    missing["read_error" if data is None else "truncated"] += 1
                    continue
                where[i] = (spool.tell(), size)
                spool.write(data)
    return where, missing


def _sample(row: dict, ext: str, image: bytes) -> dict:
    return {"__key__": row["key"], ext: image, "txt": row["caption"] or "",
            "json": json.dumps(row, default=str).encode()}


def write_shard(job: ShardJob) -> dict:
    """One output shard (a Ray task): reuse it if the disk holds this plan's, else write tar, then sidecar."""
    _fault(job)
    plan = pq.read_table(job.plan_file)
    if plan.num_rows != job.rows or keys_digest(plan.column("key").to_pylist()) != job.keys_sha256:
        raise RuntimeError(f"{job.plan_file} is not the plan this task was given (another run replanned?)")
    record = _reusable(job)
    if record is not None:
        return _entry(job, record, resumed=True)
    tar, sidecar = _paths(job)
    sidecar.unlink(missing_ok=True)  # withdraw the marker first: the old tar is about to be replaced
    carried = [f for f in plan.schema if f.name not in LEDGER_COLUMNS]
    schema = pa.schema([*SAMPLE_SCHEMA, *carried])
    located = plan.select(["key", *IMAGE_COLUMNS]).to_pylist()
    with tempfile.TemporaryFile() as spool:
        where, missing = gather_images(located, job.crawl_dir, spool)
        keep = sorted(where)
        table = plan.select(schema.names).cast(schema).take(pa.array(keep, pa.int64()))
        digest = hashlib.sha256()

        def samples():
            for i, row in zip(keep, table.to_pylist()):
                spool.seek(where[i][0])
                yield _sample(row, located[i]["image_ext"].lower(), spool.read(where[i][1]))

        write_tar(tar, samples(), digest=digest)
    record = {"keys_sha256": job.keys_sha256, "planned": job.rows, "num_samples": len(keep),
              "missing": sum(missing.values()), "missing_by_reason": dict(sorted(missing.items())),
              "bytes": tar.stat().st_size, "sha256": digest.hexdigest()}
    marked = table.replace_schema_metadata({MARKER: json.dumps(record)})
    atomic_write(sidecar, lambda tmp: pq.write_table(marked, tmp))  # the completion marker, after the tar
    return _entry(job, record, resumed=False)


# ------------------------------------------------------------------------------------------------ driver
def inputs(cfg: ShardConfig) -> tuple[dict, list[str], str]:
    """(filter manifest, ledger part paths, crawl dir), checked before anything is written."""
    fm = read_filter_manifest(cfg.filter_dir)
    files = [str(p.resolve()) for p in ledger_files(cfg.filter_dir, fm)]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise FileNotFoundError(f"{len(absent)} ledger parts the filter manifest lists are missing, e.g. "
                                f"{absent[0]}: re-run the filter")
    crawl_dir = cfg.crawl_dir or fm.get("crawl_dir") or ""
    if not crawl_dir or not os.path.isdir(crawl_dir):
        raise FileNotFoundError(f"crawl dir {crawl_dir!r} not found (pass --crawl-dir)")
    out = Path(cfg.output_dir).resolve()
    if out in (Path(cfg.filter_dir).resolve(), Path(crawl_dir).resolve()):
        raise ValueError(f"SHARDS_DIR {out} must not be the filter or the crawl dir")
    return fm, files, crawl_dir


def tidy(out: Path, planned: set[str]) -> int:
    """Delete shard files the plan does not list and temp files a killed run left. -> files removed."""
    stale = [p for p in out.iterdir() if SHARD_FILE.fullmatch(p.name) and p.stem not in planned]
    stale += [*out.glob(".shard-*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def distribute(jobs: list[ShardJob], cfg: ShardConfig) -> tuple[dict, dict]:
    """Run the shard tasks. -> ({index: entry} of the shards done, {index: cause} of those that failed)."""
    import ray

    fault = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}} if os.environ.get(FAULT_ENV) else None  # tests
    task = ray.remote(write_shard).options(num_cpus=cfg.distribute.cpus_per_task, max_retries=0,
                                           scheduling_strategy="SPREAD", runtime_env=fault)
    progress = Progress("shard", len(jobs), sum(j.rows for j in jobs), cfg.distribute.progress_interval_s)
    entries: dict[int, dict] = {}

    def on_result(i: int, entry: dict) -> None:
        entries[i] = entry
        progress.add(jobs[i].rows, entry["num_samples"])

    failures = run_tasks([j.index for j in jobs], lambda i, attempt: task.remote(replace(jobs[i], attempt=attempt)),
                         cfg.distribute, on_result, progress)
    return entries, failures


def shards_done(entries: dict) -> list[dict]:
    return [entries[i] for i in sorted(entries)]


def summarize(cfg: ShardConfig, plan: Plan, fm: dict, crawl_dir: str, entries: dict, failures: dict) -> dict:
    """Write the manifest (last): the shards done, in plan order, and the failed ones."""
    shards, missing = [], Counter()
    for i in sorted(entries):
        e = entries[i]
        missing.update(e["missing_by_reason"])
        shards.append({k: e[k] for k in ("tar", "parquet", "num_samples", "bytes", "sha256", "keys_sha256",
                                         "planned", "missing")})
    failed = [{"index": i, "tar": f"{shard_name(i)}.tar", "planned": plan.sizes[i], **failures[i]}
              for i in sorted(failures)]
    source = {"filter_dir": os.path.abspath(cfg.filter_dir), "crawl_dir": os.path.abspath(crawl_dir),
              "filter_fingerprint": fm.get("fingerprint")}
    return write_manifest(Path(cfg.output_dir), shards, missing=sum(missing.values()),
                          missing_by_reason=dict(sorted(missing.items())), planned_samples=plan.num_samples,
                          null_keys=plan.null_keys, expected_shards=len(plan.sizes), plan_id=plan.plan_id,
                          seed=cfg.seed, samples_per_shard=cfg.samples_per_shard, source=source,
                          resumed_shards=sum(e["resumed"] for e in entries.values()), failed_shards=failed,
                          nodes={e["tar"]: e["node"] for e in shards_done(entries)},
                          complete=not failed)


def run(cfg: ShardConfig) -> dict:
    """Plan, clean, run the shard tasks, write the manifest. -> the manifest."""
    fm, files, crawl_dir = inputs(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # withdrawn: readers must not trust the old shards from here on
    work = out / WORK_DIR
    shutil.rmtree(work / TMP_DIR, ignore_errors=True)
    try:
        plan = make_plan(cfg, files, fm.get("fingerprint"), work)
    finally:
        shutil.rmtree(work / TMP_DIR, ignore_errors=True)
    removed = tidy(out, {shard_name(i) for i in range(len(plan.sizes))})
    print(f"shard: {plan.num_samples} kept samples -> {len(plan.sizes)} shards (plan {plan.plan_id[:12]}, "
          f"seed {cfg.seed}; {removed} stale files removed)", file=sys.stderr, flush=True)
    jobs = [ShardJob(i, n, d, str((work / PLAN_DIR / f"{shard_name(i)}.parquet").resolve()), str(out.resolve()),
                     os.path.abspath(crawl_dir)) for i, (n, d) in enumerate(zip(plan.sizes, plan.digests))]
    init_ray(cfg.distribute.ray_address)
    entries, failures = distribute(jobs, cfg)
    return summarize(cfg, plan, fm, crawl_dir, entries, failures)


def report(m: dict, output_dir: str) -> int:
    """Print the outcome. -> 1 if shards failed every retry, else 0."""
    print(f"shard: {m['num_samples']} samples in {len(m['shards'])} shards ({m['missing']} missing in the crawl, "
          f"{m['resumed_shards']} shards already done) -> {output_dir}/{MANIFEST}", flush=True)
    for reason, n in m["missing_by_reason"].items():
        print(f"shard:   {n:8d} missing: {reason}")
    for f in m["failed_shards"][:10]:
        print(f"shard: FAILED {f['tar']} ({f['planned']} samples) after {f['attempts']} attempts: {f['type']}: "
              f"{f['error']}", file=sys.stderr)
    if m["failed_shards"]:
        print(f"shard: {len(m['failed_shards'])} shards failed; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    cli = CLI(ShardConfig, prog="clipforge shard", description=__doc__.split("\n")[0],
              presets={"default": ShardConfig, "tiny": ShardConfig.tiny})
    return run_main(cli, argv, lambda cfg: report(run(cfg), cfg.output_dir), (FileNotFoundError, ValueError),
                    prefix="shard")


if __name__ == "__main__":
    raise SystemExit(main())
