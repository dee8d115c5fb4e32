"""Stage 1 — crawl: URL + caption lists -> img2dataset-layout WebDataset shards, on Ray, exactly once.

Reads  URL lists: one or many Parquet / CSV / TSV / JSONL / TXT files, a directory or a glob, local or any fsspec
       URL (pipeline.crawl_input); url / caption columns configurable, every other column carried (or those named).
Writes CRAWL_DIR/ in img2dataset's layout (trainer.clip.formats.crawl): per shard NNNNN.tar (successes: KEY.jpg,
       KEY.txt, KEY.json), NNNNN.parquet (every input row: status, error_class, error_message, sizes, sha256, the
       carried columns), NNNNN_stats.json (the marker, last); _clipforge/crawl_plan.json (first) and
       _clipforge/crawl_manifest.json (last, also when the run fails).

The driver plans and the workers work: row counts come from Parquet footers or from count tasks, the input is
split into (file, row range) shards without the driver reading a row, and one Ray task per shard
(pipeline.crawl_shard) fetches, resizes, writes and commits it. pipeline.distribute keeps a bounded number of
tasks in flight, retries failed shards with backoff (a lost node's shards run elsewhere) and reports the ones that
failed every attempt with their cause.

Rerun = resume: the same command skips every shard whose marker carries this crawl's fingerprint, deletes
uncommitted files and redoes the rest. A different input list or output layout in the same dir is refused (exit 2).
Timeouts, retries and politeness settings may change between runs.

    python -m pipeline.crawl urls/ /data/crawl                     # local: in-process Ray on 127.0.0.1
    ray job submit --working-dir . -- python -m pipeline.crawl 's3://bucket/urls/*.parquet' /shared/crawl
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) must not phone home

from pipeline.common import init_ray  # noqa: E402
from pipeline.crawl_input import (InputFile, ShardSpec, column_names, count_rows, file_size,  # noqa: E402
                                  input_fingerprint, list_input_files, plan_shards)
from pipeline.crawl_shard import FAULT_ENV, OUTPUT_COLUMNS, ImageConfig, ShardJob, crawl_one  # noqa: E402
from pipeline.distribute import DistributeConfig, Progress, run_tasks  # noqa: E402
from pipeline.fetch import FetchConfig  # noqa: E402
from trainer.clip.flags import CLI, opt, require, run_main, section  # noqa: E402
from trainer.clip.formats.atomic import atomic_write_json, read_json  # noqa: E402
from trainer.clip.formats.crawl import (CRAWL_FORMAT, CRAWL_MANIFEST, CRAWL_PLAN, CRAWL_TMP,  # noqa: E402
                                        complete_shards, read_marker, shard_files)


@dataclass
class CrawlConfig:
    """A crawl: the URL lists and their columns, the shard size, and the fetch / image / distributor sections."""
    url_list: str = opt("", positional=True, help="URL list: a file, a directory, a glob or an fsspec URL of "
                                                  "Parquet / CSV / TSV / JSONL / TXT files")
    output_dir: str = opt("", positional=True, help="CRAWL_DIR to write (img2dataset's webdataset layout)")
    input_format: str = opt("", help="parquet, csv, tsv, jsonl or txt (default: from each file's extension)")
    url_col: str = opt("url", help="the URL column")
    caption_col: str = opt("caption", help="the caption column ('' for none)")
    save_additional_columns: list[str] | None = opt(None, nargs="*", help="input columns carried to every sample's "
                                                    "json and parquet row (default: all; no names: none)")
    samples_per_shard: int = opt(10_000, help="input rows per crawl shard")
    thread_count: int = opt(64, help="download threads per shard task")
    fetch: FetchConfig = section(FetchConfig)
    image: ImageConfig = section(ImageConfig)
    distribute: DistributeConfig = section(DistributeConfig)

    def __post_init__(self):
        require(self, "samples_per_shard", self.samples_per_shard >= 1, "must be >= 1")
        require(self, "thread_count", self.thread_count >= 1, "must be >= 1")

    @classmethod
    def tiny(cls, url_list: str = "", output_dir: str = "") -> "CrawlConfig":
        return cls(url_list=url_list, output_dir=output_dir, samples_per_shard=100, thread_count=16,
                   fetch=FetchConfig(timeout=5), image=ImageConfig(image_size=128),
                   distribute=DistributeConfig(retry_backoff_s=0.5, progress_interval_s=2))

    def layout(self) -> dict:
        """The settings that decide what the shards contain: a rerun must keep them."""
        return {"url_col": self.url_col, "caption_col": self.caption_col, "samples_per_shard": self.samples_per_shard,
                "save_additional_columns": self.save_additional_columns, "image": asdict(self.image)}


class CrawlRefused(ValueError):
    """The output dir belongs to another crawl (different input, layout, or not a clipforge crawl)."""


# ------------------------------------------------------------------------------------------------ plan
def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _count_task(f: InputFile) -> dict:
    f = count_rows(f)
    return {"url": f.url, "format": f.format, "rows": f.rows, "size": f.size, "columns": column_names(f)}


def count_files(files: list[InputFile], cfg: CrawlConfig) -> list[dict]:
    """Row count, size and columns of every input file, counted by Ray tasks (text formats are streamed)."""
    import ray

    task = ray.remote(_count_task).options(num_cpus=cfg.distribute.cpus_per_task, max_retries=0)
    out: dict = {}
    failures = run_tasks(files, lambda f, _: task.remote(f), cfg.distribute, lambda f, r: out.__setitem__(f, r))
    if failures:
        f, cause = next(iter(failures.items()))
        raise CrawlRefused(f"cannot read input {f.url}: {cause['type']}: {cause['error']}")
    return [out[f] for f in files]


def check_columns(files: list[dict], cfg: CrawlConfig) -> None:
    for f in files:
        if f["format"] != "txt" and cfg.url_col not in f["columns"]:
            raise CrawlRefused(f"{f['url']} has no url column {cfg.url_col!r} (columns: {f['columns']})")
        missing = set(cfg.save_additional_columns or ()) - set(f["columns"])
        if missing and f["format"] != "txt":  # a TXT list has only URLs: it carries nothing
            raise CrawlRefused(f"{f['url']} lacks the --save-additional-columns {sorted(missing)}")


def extra_names(columns: list[str], cfg: CrawlConfig) -> dict[str, str]:
    """Carried input column -> its output name (a clash with an output column gets the prefix 'input_')."""
    own = {cfg.url_col, cfg.caption_col}
    cols = cfg.save_additional_columns if cfg.save_additional_columns is not None else \
        [c for c in columns if c not in own]
    taken = {"url", "caption", *OUTPUT_COLUMNS}
    return {c: f"input_{c}" if c in taken else c for c in cols}


def load_plan(cfg: CrawlConfig, files: list[InputFile]) -> dict:
    """The crawl plan of OUTPUT_DIR: reused when the input and layout match, written when new, else refused."""
    root = Path(cfg.output_dir)
    path = root / CRAWL_PLAN
    listing = [{"url": _absolute(f.url), "format": f.format} for f in files]
    if path.exists():
        plan = read_json(path)
        if [{"url": f["url"], "format": f["format"]} for f in plan["files"]] != listing or \
                any(file_size(f["url"]) != f["size"] for f in plan["files"]):
            raise CrawlRefused(f"{root} holds a crawl of a different input list ({len(plan['files'])} files, first "
                               f"{plan['files'][0]['url']}); use a new output dir")
        if plan["layout"] != json.loads(json.dumps(cfg.layout())):
            raise CrawlRefused(f"{root} was crawled with other layout settings {plan['layout']}; use a new output "
                               f"dir or the same settings")
        return plan
    if shard_files(root):
        raise CrawlRefused(f"{root} already has shard files but no {CRAWL_PLAN} (another tool's crawl?); "
                           "use an empty or new output dir")
    counted = count_files([InputFile(x["url"], x["format"]) for x in listing], cfg)
    check_columns(counted, cfg)
    body = {"files": counted, "layout": cfg.layout()}
    inputs = input_fingerprint([InputFile(f["url"], f["format"], f["rows"], f["size"]) for f in counted])
    fp = hashlib.sha256((inputs + json.dumps(body["layout"], sort_keys=True)).encode()).hexdigest()[:16]
    plan = {"format": CRAWL_FORMAT, "fingerprint": fp, **body, "input_rows": sum(f["rows"] for f in counted),
            "created": time.time()}
    atomic_write_json(path, plan)
    return plan


def tidy(root: Path, done: set[int]) -> int:
    """Delete what a killed run left: scratch dirs, temp files, shard files without a valid marker. -> files removed."""
    removed = 0
    shutil.rmtree(root / CRAWL_TMP, ignore_errors=True)
    for p in [*root.glob(".*.tmp"), *(root / "_clipforge").glob(".*.tmp")]:
        p.unlink(missing_ok=True)
        removed += 1
    for p in shard_files(root):
        if int(re.match(r"\d+", p.name).group()) not in done:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------------ run
def shard_jobs(plan: dict, cfg: CrawlConfig) -> list[ShardJob]:
    files = [InputFile(f["url"], f["format"], f["rows"]) for f in plan["files"]]
    names = {f["url"]: extra_names(f["columns"], cfg) if f["format"] != "txt" else {} for f in plan["files"]}
    extra = cfg.save_additional_columns
    return [ShardJob(spec=s, output_dir=os.path.abspath(cfg.output_dir), fingerprint=plan["fingerprint"],
                     samples_per_shard=cfg.samples_per_shard, url_col=cfg.url_col, caption_col=cfg.caption_col or None,
                     extra_cols=list(names[s.file]) if extra is None or s.format == "txt" else extra,
                     fetch=cfg.fetch, image=cfg.image,
                     thread_count=cfg.thread_count, driver_pid=os.getpid(), extra_names=names[s.file])
            for s in plan_shards(files, cfg.samples_per_shard)]


def distribute(jobs: list[ShardJob], cfg: CrawlConfig, rows: int) -> dict:
    """Run the shard jobs. -> {shard id: cause} of the shards that failed every attempt."""
    import dataclasses

    import ray

    fault = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}} if os.environ.get(FAULT_ENV) else None  # tests
    task = ray.remote(crawl_one).options(num_cpus=cfg.distribute.cpus_per_task, max_retries=0,
                                         scheduling_strategy="SPREAD", runtime_env=fault)
    progress = Progress("crawl", len(jobs), rows, cfg.distribute.progress_interval_s)
    by_spec = {j.spec: j for j in jobs}

    def submit(spec: ShardSpec, attempt: int):
        return task.remote(dataclasses.replace(by_spec[spec], attempt=attempt))

    failures = run_tasks([j.spec for j in jobs], submit, cfg.distribute,
                         lambda spec, m: progress.add(m["count"], m["successes"]), progress)
    return {spec.id: {"file": spec.file, "rows": [spec.start, spec.stop], **cause} for spec, cause in failures.items()}


def run(cfg: CrawlConfig) -> dict:
    """Plan (or resume) the crawl, run the missing shards, write the manifest (also when this raises)."""
    t0 = time.time()
    files = list_input_files(cfg.url_list, cfg.input_format)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.distribute.ray_address)
    plan = load_plan(cfg, files)
    jobs = shard_jobs(plan, cfg)
    done = {s.id for s in complete_shards(root, plan["fingerprint"])}
    tidy(root, done)
    todo = [j for j in jobs if j.spec.id not in done]
    print(f"crawl: {plan['input_rows']} rows in {len(plan['files'])} files -> {len(jobs)} shards "
          f"({len(done)} already complete, {len(todo)} to crawl)", file=sys.stderr, flush=True)
    failed, error = {}, None
    try:
        failed = distribute(todo, cfg, sum(j.spec.stop - j.spec.start for j in todo))
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:  # no task of this run is still running: scratch dirs left are those of attempts that died
        shutil.rmtree(root / CRAWL_TMP, ignore_errors=True)
        manifest = summarize(cfg, plan, jobs, failed, error, t0)
        write_manifest(root, manifest)
    return manifest


def write_manifest(root: Path, manifest: dict) -> None:
    if os.environ.get(FAULT_ENV) == "manifest":  # tests: a kill -9 while the manifest is being written
        from trainer.clip.formats.atomic import atomic_open

        with atomic_open(root / CRAWL_MANIFEST, "w") as f:
            f.write(json.dumps(manifest)[:100])
            f.flush()
            os.kill(os.getpid(), 9)
    atomic_write_json(root / CRAWL_MANIFEST, manifest)


# ------------------------------------------------------------------------------------------------ manifest
def _shard_entry(m: dict, shard) -> dict:
    return {"id": m["shard"], "tar": shard.tar.name, "parquet": shard.parquet.name, "stats": shard.stats.name,
            "rows": m["count"], "success": m["successes"], "failed_to_download": m["failed_to_download"],
            "failed_to_resize": m["failed_to_resize"], "duration_s": round(m["duration"], 3),
            "node_id": m.get("node_id"), "attempt": m.get("attempt")}


def _timings(entries: list[dict]) -> dict:
    d = sorted(e["duration_s"] for e in entries)
    if not d:
        return {}
    slowest = sorted(entries, key=lambda e: -e["duration_s"])[:5]
    return {"p50_s": d[len(d) // 2], "p95_s": d[min(len(d) - 1, int(len(d) * 0.95))], "max_s": d[-1],
            "slowest": [{"id": e["id"], "duration_s": e["duration_s"], "node_id": e["node_id"]} for e in slowest]}


def summarize(cfg: CrawlConfig, plan: dict, jobs: list[ShardJob], failed: dict, error: str | None,
              t0: float) -> dict:
    """The crawl manifest, from the markers on disk (this crawl's fingerprint only) and the distributor's failures."""
    from collections import Counter

    from trainer.clip.formats.crawl import crawl_shard

    root, entries, classes, totals = Path(cfg.output_dir), [], Counter(), Counter()
    now_images = now_bytes = 0
    for j in jobs:
        shard = crawl_shard(root, j.spec.id)
        m = read_marker(shard.stats)
        if m is None or m.get("fingerprint") != plan["fingerprint"]:
            continue
        entries.append(_shard_entry(m, shard))
        classes.update(m.get("error_classes", {}))
        totals.update({"rows": m["count"], "success": m["successes"], "failed_to_download": m["failed_to_download"],
                       "failed_to_resize": m["failed_to_resize"], "bytes": m.get("bytes", 0)})
        if m["start_time"] >= t0:
            now_images, now_bytes = now_images + m["successes"], now_bytes + m.get("bytes", 0)
    done = {e["id"] for e in entries}
    not_run = {"type": "NotRun", "error": error or "the run ended before this shard", "attempts": 0}
    failed_shards = [{"id": j.spec.id, "file": j.spec.file, "rows": [j.spec.start, j.spec.stop],
                      **{k: v for k, v in failed.get(j.spec.id, not_run).items() if k not in ("file", "rows")}}
                     for j in jobs if j.spec.id not in done]
    totals["rows_in_failed_shards"] = sum(f["rows"][1] - f["rows"][0] for f in failed_shards)
    wall = time.time() - t0
    return {"format": CRAWL_FORMAT, "config": asdict(cfg), "fingerprint": plan["fingerprint"],
            "input_rows": plan["input_rows"], "input_files": len(plan["files"]), "expected_shards": len(jobs),
            "shards": entries, "failed_shards": failed_shards, "totals": dict(totals),
            "success_rate": round(totals["success"] / max(1, totals["rows"]), 4),
            "errors": dict(classes.most_common()),
            "this_run": {"wall_s": round(wall, 2), "images": now_images, "images_per_s": round(now_images / wall, 1),
                         "bytes_per_s": round(now_bytes / wall)},
            "shard_timings": _timings(entries), "error": error, "complete": not failed_shards and error is None}


def report(m: dict, output_dir: str) -> int:
    """Print the crawl's outcome. -> 1 if shards still failed after the retries, else 0."""
    t, r = m["totals"], m["this_run"]
    print(f"crawl: {t.get('success', 0)}/{m['input_rows']} images ({m['success_rate']:.1%} of crawled rows) in "
          f"{len(m['shards'])} shards; this run {r['images']} images in {r['wall_s']} s = {r['images_per_s']} "
          f"images/s, {r['bytes_per_s'] / 1e6:.1f} MB/s -> {output_dir}/{CRAWL_MANIFEST}", flush=True)
    for cls, c in list(m["errors"].items())[:12]:
        print(f"crawl:   {c:8d}  {cls}")
    if m["shard_timings"]:
        st = m["shard_timings"]
        print(f"crawl: shard time p50 {st['p50_s']:.1f} s, p95 {st['p95_s']:.1f} s, max {st['max_s']:.1f} s "
              f"(shard {st['slowest'][0]['id']})")
    for f in m["failed_shards"][:10]:
        print(f"crawl: FAILED shard {f['id']} ({f['file']} rows {f['rows'][0]}-{f['rows'][1]}) after "
              f"{f['attempts']} attempts: {f['type']}: {f['error']}", file=sys.stderr)
    if m["failed_shards"]:
        print(f"crawl: {len(m['failed_shards'])} shards failed ({t['rows_in_failed_shards']} rows); rerun the same "
              "command to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    cli = CLI(CrawlConfig, prog="clipforge crawl", description=__doc__.split("\n")[0],
              presets={"default": CrawlConfig, "tiny": CrawlConfig.tiny})
    return run_main(cli, argv, lambda cfg: report(run(cfg), cfg.output_dir), (FileNotFoundError, ValueError),
                    prefix="crawl")


if __name__ == "__main__":
    raise SystemExit(main())
