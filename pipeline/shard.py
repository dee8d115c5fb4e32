"""Stage 3 — shard: copy the kept samples into training shards (WebDataset .tar + Parquet + manifest).

Reads  FILTER_DIR/decisions.parquet (keep == true rows) and the crawl tars they point at.
Writes SHARDS_DIR/shard-00000.tar      per sample KEY.jpg (bytes copied as crawled, never re-encoded), KEY.txt
                                       (caption), KEY.json (key, url, caption, width, height, sha256)
       SHARDS_DIR/shard-00000.parquet  one row per sample: key, url, caption, width, height, sha256
       SHARDS_DIR/manifest.json        {"format": "clipforge.shards.v1", "num_samples", "shards": [{tar, parquet,
                                       num_samples}], "missing": n} — written last; readers trust only listed shards

One Ray task per output shard. Each task writes its tar and then its parquet through temp files + rename, so the
parquet is the shard's completion marker: a rerun (or a resumed, killed job) skips shards whose parquet exists
with the planned row count. The plan is deterministic (kept keys in sorted order), so reruns are idempotent.
A kept sample that is missing or unreadable in the crawl tar is counted in the manifest, never a crash.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common import init_ray
from trainer.clip.flags import CLI, opt, require, run_main
from trainer.clip.formats.atomic import atomic_write
from trainer.clip.formats.crawl import carried_fields
from trainer.clip.formats.decisions import DECISIONS_SCHEMA, decisions_path, read_filter_manifest
from trainer.clip.formats.shards import MANIFEST, SAMPLE_SCHEMA, iter_tar_samples, shard_name, write_manifest, write_tar

@dataclass
class ShardConfig:
    """What is sharded, how big the shards are, and where the work runs."""
    filter_dir: str = opt("", positional=True, help="FILTER_DIR: decisions.parquet + filter_manifest.json")
    output_dir: str = opt("", positional=True, help="SHARDS_DIR to write")
    crawl_dir: str = opt("", help="the crawl dir (default: the one recorded by the filter stage)")
    samples_per_shard: int = opt(10_000, help="samples per output shard")
    image_ext: str = opt("jpg", help="the image member copied from the crawl tars")
    ray_address: str | None = opt(None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local "
                                             "in-process Ray)")

    def __post_init__(self):
        require(self, "samples_per_shard", self.samples_per_shard >= 1, "must be >= 1")

    @classmethod
    def tiny(cls, filter_dir: str, output_dir: str) -> "ShardConfig":
        return cls(filter_dir=filter_dir, output_dir=output_dir, samples_per_shard=64)


def plan(cfg: ShardConfig) -> list[list[dict]]:
    """Kept rows, sorted by key, cut into output shards."""
    schema = pq.read_schema(decisions_path(cfg.filter_dir))
    columns = ["key", "url", "caption", "shard", "width", "height", "sha256", "keep",
               *(f.name for f in carried_fields(schema, DECISIONS_SCHEMA.names))]
    table = pq.read_table(decisions_path(cfg.filter_dir), columns=columns)
    rows = sorted((r for r in table.to_pylist() if r["keep"]), key=lambda r: r["key"])
    n = cfg.samples_per_shard
    return [rows[i:i + n] for i in range(0, len(rows), n)]


def _read_members(tar_path: str, wanted: set[str], ext: str) -> dict[str, bytes]:
    """key -> image bytes for the wanted keys of one crawl tar (a truncated tar yields what it can)."""
    found: dict[str, bytes] = {}
    try:
        for sample in iter_tar_samples(tar_path, read=lambda e: e == ext):
            if sample.key in wanted and ext in sample.members:
                found[sample.key] = sample.members[ext].data
    except (OSError, tarfile.TarError, EOFError) as e:
        print(f"shard: warning: {tar_path}: {e}", file=sys.stderr)
    return found


def write_shard(cfg_dict: dict, crawl_dir: str, idx: int, rows: list[dict], carried: list) -> dict:
    """Write one output shard (runs as a Ray task). Returns its manifest entry."""
    cfg = ShardConfig(**cfg_dict)
    out = Path(cfg.output_dir)
    name = shard_name(idx)
    tar_path, pq_path = out / f"{name}.tar", out / f"{name}.parquet"
    if pq_path.exists():  # done marker: reuse it if it matches the plan
        done = pq.ParquetFile(pq_path)
        missing = int((done.schema_arrow.metadata or {}).get(b"missing", b"0"))
        if done.metadata.num_rows + missing == len(rows):
            return {"tar": tar_path.name, "parquet": pq_path.name, "num_samples": done.metadata.num_rows,
                    "missing": missing, "skipped_existing": True}

    images: dict[str, bytes] = {}
    by_src: dict[str, set[str]] = {}
    for r in rows:
        by_src.setdefault(r["shard"], set()).add(r["key"])
    for src, keys in sorted(by_src.items()):
        images.update(_read_members(os.path.join(crawl_dir, src), keys, cfg.image_ext))

    schema = pa.schema([*SAMPLE_SCHEMA, *carried])  # the crawl input's extra columns ride along
    written = [{k: r[k] for k in schema.names} for r in rows if r["key"] in images]
    write_tar(tar_path, ({"__key__": m["key"], cfg.image_ext: images[m["key"]], "txt": m["caption"] or "",
                          "json": json.dumps(m).encode()} for m in written))
    missing = len(rows) - len(written)
    table = pa.Table.from_pylist(written, schema=schema).replace_schema_metadata({"missing": str(missing)})
    atomic_write(pq_path, lambda tmp: pq.write_table(table, tmp))  # the completion marker, after the tar
    return {"tar": tar_path.name, "parquet": pq_path.name, "num_samples": len(written), "missing": missing,
            "skipped_existing": False}


def run(cfg: ShardConfig) -> dict:
    decisions = decisions_path(cfg.filter_dir)
    if not decisions.exists():
        raise FileNotFoundError(f"{decisions} does not exist: run the filter stage first")
    crawl_dir = cfg.crawl_dir or read_filter_manifest(cfg.filter_dir)["crawl_dir"]
    shards = plan(cfg)
    if not shards:
        raise ValueError(f"no kept samples in {decisions}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ray = init_ray(cfg.ray_address)
    task = ray.remote(write_shard)
    carried = carried_fields(pq.read_schema(decisions_path(cfg.filter_dir)), DECISIONS_SCHEMA.names)
    entries = ray.get([task.remote(asdict(cfg), crawl_dir, i, rows, carried) for i, rows in enumerate(shards)])
    return write_manifest(out, [{k: e[k] for k in ("tar", "parquet", "num_samples")} for e in entries],
                          missing=sum(e["missing"] for e in entries),
                          source={"filter_dir": os.path.abspath(cfg.filter_dir), "crawl_dir": os.path.abspath(crawl_dir)},
                          resumed_shards=sum(e["skipped_existing"] for e in entries))


def report(m: dict, output_dir: str) -> int:
    print(f"shard: {m['num_samples']} samples in {len(m['shards'])} shards ({m['missing']} missing in the crawl, "
          f"{m['resumed_shards']} shards already done) -> {output_dir}/{MANIFEST}", flush=True)
    return 0


def main(argv=None) -> int:
    cli = CLI(ShardConfig, prog="clipforge shard", description=__doc__.split("\n")[0])
    return run_main(cli, argv, lambda cfg: report(run(cfg), cfg.output_dir), (FileNotFoundError, ValueError),
                    prefix="shard")


if __name__ == "__main__":
    raise SystemExit(main())
