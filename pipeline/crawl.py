"""Stage 1 — crawl: URL + caption list -> WebDataset shards, with img2dataset's Ray distributor.

Reads  a Parquet (or CSV / JSONL) file with a url and a caption column.
Writes CRAWL_DIR/ in img2dataset's layout, plus our commit record:
    00000.tar            successful samples: KEY.jpg, KEY.txt, KEY.json  (KEY = 9 digits: shard id + row)
    00000.parquet        every input row of the shard: url, caption, key, status, error_message, width, height,
                         original_width, original_height, sha256, exif
    00000_stats.json     written last by img2dataset: the shard's completion marker
    _clipforge/crawl_manifest.json  (ours, atomic, written last) the complete shards, totals, error counts, and the
                         shards that still failed after retries with their input row ranges

img2dataset's Ray distributor ignores `max_shard_retry` and drops a failed shard silently (its per-shard exception
is swallowed, its input slice deleted). We do not trust it: after each pass we list the shards that have a
`_stats.json`, and re-run img2dataset in incremental mode (which redoes exactly the missing shards) up to
`max_shard_retry` times; what is still missing is recorded in the manifest and printed, never silently lost.
A killed crawl resumes the same way: rerun the same command.

Run locally (`python -m pipeline.crawl URLS OUT`, in-process Ray on 127.0.0.1) or on a cluster:
    ray job submit --working-dir . -- python -m pipeline.crawl urls.parquet /data/crawl
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) must not phone home

from pipeline.common import init_ray  # noqa: E402
from trainer.clip.flags import CLI, opt, run_main  # noqa: E402
from trainer.clip.formats.atomic import atomic_write_json, read_json  # noqa: E402
from trainer.clip.formats.crawl import CRAWL_FORMAT, CRAWL_MANIFEST, complete_shards  # noqa: E402



@dataclass
class CrawlConfig:
    """A crawl: the URL list, img2dataset's download settings, and the retry and cluster settings."""
    url_list: str = opt("", positional=True, help="Parquet / CSV / TSV / JSONL file with url + caption columns")
    output_dir: str = opt("", positional=True, help="CRAWL_DIR to write (img2dataset's webdataset layout)")
    input_format: str = opt("", help="parquet, csv, tsv, json or txt (default: from the file extension)")
    url_col: str = opt("url", help="the URL column")
    caption_col: str = opt("caption", help="the caption column")
    samples_per_shard: int = opt(10_000, help="input rows per crawl shard")
    thread_count: int = opt(64, help="download threads per shard task (img2dataset's default is 256)")
    timeout: int = opt(10, help="seconds per socket operation of a download")
    retries: int = opt(0, help="download retries per sample")
    image_size: int = opt(256, help="resize target side in pixels")
    resize_mode: str = opt("keep_ratio", choices=("no", "keep_ratio", "center_crop", "border"),
                           help="img2dataset's resize mode (keep_ratio: the trainer centre-crops)")
    resize_only_if_bigger: bool = opt(True, help="never upscale")
    encode_format: str = opt("jpg", help="image format written to the tars")
    max_shard_retry: int = opt(2, help="extra passes over the shards img2dataset dropped")
    save_additional_columns: list[str] = opt(default_factory=list, nargs="*",
                                             help="input columns copied to every sample's json and parquet row")
    ignore_opt_out: bool = opt(False, help="do not honour X-Robots-Tag noai / noimageai / noindex / noimageindex")
    ray_address: str | None = opt(None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local "
                                             "in-process Ray)")

    @classmethod
    def tiny(cls, url_list: str, output_dir: str) -> "CrawlConfig":
        return cls(url_list=url_list, output_dir=output_dir, samples_per_shard=100, thread_count=16, timeout=5,
                   image_size=128)


def _input_format(cfg: CrawlConfig) -> str:
    if cfg.input_format:
        return cfg.input_format
    ext = Path(cfg.url_list).suffix.lower().lstrip(".")
    return {"jsonl": "json", "txt": "txt"}.get(ext, ext)


def count_rows(cfg: CrawlConfig) -> int:
    fmt = _input_format(cfg)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(cfg.url_list).metadata.num_rows
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    if fmt == "json":
        return pjson.read_json(cfg.url_list).num_rows
    opts = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
    return pcsv.read_csv(cfg.url_list, parse_options=opts).num_rows


def done_shards(output_dir: str) -> set[int]:
    """Shard ids whose `_stats.json` exists (img2dataset writes it after the tar and parquet are closed)."""
    return {s.id for s in complete_shards(output_dir)}


def _run_img2dataset(cfg: CrawlConfig) -> None:
    from img2dataset import download

    download(
        url_list=cfg.url_list, output_folder=cfg.output_dir, input_format=_input_format(cfg), url_col=cfg.url_col,
        caption_col=cfg.caption_col, output_format="webdataset", distributor="ray",
        number_sample_per_shard=cfg.samples_per_shard, thread_count=cfg.thread_count, timeout=cfg.timeout,
        retries=cfg.retries, image_size=cfg.image_size, resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger, encode_format=cfg.encode_format,
        save_additional_columns=cfg.save_additional_columns or None, compute_hash="sha256",
        incremental_mode="incremental", enable_wandb=False,
        disallowed_header_directives=[] if cfg.ignore_opt_out else None,
    )


def summarize(cfg: CrawlConfig, n_rows: int, attempts: int, wall_s: float) -> dict:
    """Build the crawl manifest from what is on disk (stats + per-shard parquet status columns)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    n_shards = max(1, math.ceil(n_rows / cfg.samples_per_shard))
    done = complete_shards(cfg.output_dir)
    shards, errors = [], {}
    totals = {"rows": 0, "success": 0, "failed_to_download": 0, "failed_to_resize": 0}
    for shard in done:
        stats = read_json(shard.stats)
        status = pq.read_table(shard.parquet, columns=["status"]).column("status")
        counts = {k: int(pc.sum(pc.equal(status, k)).as_py() or 0) for k in ("success", "failed_to_download",
                                                                          "failed_to_resize")}
        shards.append({"id": shard.id, "tar": shard.tar.name, "parquet": shard.parquet.name,
                       "stats": shard.stats.name, "rows": len(status), **counts})
        totals["rows"] += len(status)
        for k, v in counts.items():
            totals[k] += v
        for msg, c in stats.get("status_dict", {}).items():
            if msg != "success":
                errors[msg] = errors.get(msg, 0) + c
    done_ids = {shard.id for shard in done}
    failed = [{"id": s, "rows": [s * cfg.samples_per_shard, min(n_rows, (s + 1) * cfg.samples_per_shard)]}
              for s in range(n_shards) if s not in done_ids]
    totals["rows_in_failed_shards"] = sum(f["rows"][1] - f["rows"][0] for f in failed)
    return {"format": CRAWL_FORMAT, "config": asdict(cfg), "input_rows": n_rows, "expected_shards": n_shards,
            "shards": shards, "failed_shards": failed, "totals": totals, "errors": errors, "attempts": attempts,
            "wall_s": round(wall_s, 2), "complete": not failed}


def run(cfg: CrawlConfig) -> dict:
    if not Path(cfg.url_list).is_file():
        raise FileNotFoundError(f"url list {cfg.url_list!r} does not exist")
    n_rows = count_rows(cfg)
    if n_rows == 0:
        raise ValueError(f"url list {cfg.url_list!r} has no rows")
    n_shards = math.ceil(n_rows / cfg.samples_per_shard)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray_address)
    t0, attempts = time.time(), 0
    while attempts <= cfg.max_shard_retry:
        missing = set(range(n_shards)) - done_shards(cfg.output_dir)
        if not missing:
            break
        attempts += 1
        print(f"crawl: pass {attempts}: {len(missing)}/{n_shards} shards to download", flush=True)
        _run_img2dataset(cfg)
    manifest = summarize(cfg, n_rows, attempts, time.time() - t0)
    atomic_write_json(Path(cfg.output_dir) / CRAWL_MANIFEST, manifest)
    return manifest


def report(m: dict, output_dir: str) -> int:
    """Print the crawl's outcome. -> 1 if shards still failed after the retries, else 0."""
    t = m["totals"]
    print(f"crawl: {t['success']}/{m['input_rows']} images in {len(m['shards'])} shards "
          f"({t['failed_to_download']} failed to download, {t['failed_to_resize']} failed to decode/resize) "
          f"-> {output_dir}/{CRAWL_MANIFEST}", flush=True)
    for msg, c in sorted(m["errors"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"crawl:   {c:6d}  {msg}")
    if m["failed_shards"]:
        print(f"crawl: WARNING {len(m['failed_shards'])} shards failed after {m['attempts']} passes "
              f"({t['rows_in_failed_shards']} rows); rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    cli = CLI(CrawlConfig, prog="clipforge crawl", description=__doc__.split("\n")[0])
    return run_main(cli, argv, lambda cfg: report(run(cfg), cfg.output_dir), (FileNotFoundError, ValueError),
                    prefix="crawl")


if __name__ == "__main__":
    raise SystemExit(main())
