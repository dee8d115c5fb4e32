"""Curation throughput and memory: `clipforge filter` + `clipforge shard` against the I/O floor, the filter at
millions of rows, and the CLIP score on CPU.

    python bench/bench_filter.py [--rows 5000000] [--images 20000] [--clip-images 512] [--out bench/results/x.json]

1. scale: a synthetic crawl of ROWS metadata rows (parquet only, 10,000 per shard: captions in several languages,
   planted (url, caption) and image-hash duplicates, sizes) filtered with language ID, the caption / size rules,
   exact dedup and metadata balancing (`--no-require-images`: no image is read). Wall time, seconds per million
   rows, and the peak RSS of the whole process tree (driver, Ray, workers).
2. floor: a crawl of IMAGES real JPEGs (8 tars): filter (basic rules, exact + pHash near-dup) + shard, in
   samples/s per core, against a plain loop that reads every crawl tar and writes its members to a new tar (the
   I/O floor the two stages cannot beat); the ratio floor / (filter + shard) is printed.
3. clip: CLIP-score images/s on CPU (a randomly initialised ViT-B/32: the cost, not the quality), through the
   filter's actor pool.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import timed  # noqa: E402

WORDS = ("red apple cat dog house car tree flower bird fish train book ball moon sun star river mountain city "
         "street beach boat chair table lamp phone guitar pizza cake bread coffee").split()
FOREIGN = ["une pomme rouge sur la table", "ein roter Apfel auf dem Tisch", "una manzana roja en la mesa",
           "赤いリンゴ", "красное яблоко на столе"]


def metadata_shard(shard_id: int, n: int, seed: int):
    """One synthetic crawl parquet (the crawl's columns): -> pyarrow Table."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed * 100_003 + shard_id)
    base = shard_id * n
    w = np.array(WORDS)
    caps = np.char.add(np.char.add("a photo of a ", w[rng.integers(0, len(w), n)]), " and a ")
    caps = np.char.add(np.char.add(caps, w[rng.integers(0, len(w), n)]), np.char.mod(" number %d", np.arange(n)))
    caps = caps.astype(object)
    foreign = rng.random(n) < 0.05
    caps[foreign] = np.array(FOREIGN, object)[rng.integers(0, len(FOREIGN), foreign.sum())]
    short = rng.random(n) < 0.03
    caps[short] = "img"
    keys = np.char.zfill(np.arange(base, base + n).astype(str), 9)
    urls = np.char.add(np.char.add("http://img.example.com/", keys), ".jpg").astype(object)
    sha = np.array([f"{x:064x}" for x in rng.integers(0, 2**62, n)], object)
    dup_img, dup_pair = rng.random(n) < 0.01, rng.random(n) < 0.01
    sha[dup_img] = sha[0]  # planted: the same image bytes again
    urls[dup_pair], caps[dup_pair] = urls[1], caps[1]  # planted: the same (url, caption) again
    ok = rng.random(n) > 0.1
    side = rng.integers(64, 1024, (2, n)).astype(np.int32)
    return pa.table({
        "url": urls, "caption": caps, "key": keys.astype(object),
        "status": np.where(ok, "success", "failed_to_download").astype(object),
        "error_message": pa.nulls(n, pa.string()), "error_class": np.where(ok, None, "http_error"),
        "width": side[0], "height": side[1], "original_width": side[0], "original_height": side[1],
        "exif": pa.nulls(n, pa.string()), "sha256": sha})


def metadata_crawl(root: Path, rows: int, per_shard: int = 10_000, seed: int = 0) -> int:
    """ROOT: a parquet-only crawl dir of `rows` rows (shards written one at a time). -> shards."""
    import pyarrow.parquet as pq

    from trainer.clip.formats.crawl import crawl_shard

    root.mkdir(parents=True, exist_ok=True)
    shards = (rows + per_shard - 1) // per_shard
    for i in range(shards):
        files = crawl_shard(root, i)
        pq.write_table(metadata_shard(i, min(per_shard, rows - i * per_shard), seed), files.parquet)
        files.stats.write_text(json.dumps({"count": min(per_shard, rows - i * per_shard)}))
    (root / "terms.txt").write_text("\n".join(WORDS[:12]) + "\n")
    return shards


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def scale(rows: int, work: Path, per_shard: int = 10_000, memory_limit: str = "1GB") -> dict:
    crawl, out = work / "meta-crawl", work / "meta-filter"
    t0 = time.time()
    shards = metadata_crawl(crawl, rows, per_shard)
    made = time.time() - t0
    cmd = [sys.executable, "-m", "pipeline.filter", str(crawl), str(out), "--no-require-images",
           "--metadata-terms", str(crawl / "terms.txt"), "--per-term-cap", str(max(1, rows // 40)),
           "--memory-limit", memory_limit, "--progress-interval-s", "30"]
    wall, peak, rc = timed(cmd, _env(), work / "scale.log")
    if rc != 0:
        raise RuntimeError(f"filter failed ({rc}): {(work / 'scale.log').read_text()[-3000:]}")
    m = json.loads((out / "filter_manifest.json").read_text())
    return {"rows": rows, "shards": shards, "make_s": round(made, 1), "wall_s": round(wall, 1),
            "s_per_million_rows": round(wall / rows * 1e6, 1), "rows_per_s": round(rows / wall),
            "peak_rss_tree_mb": round(peak), "peak_rss_mb": m["peak_rss_mb"], "kept": m["kept"],
            "dropped": {k: v for k, v in m["dropped"].items() if v}, "timings_s": m["timings_s"]}


# ---- filter + shard vs the I/O floor -----------------------------------------------------------------------------
def image_crawl(root: Path, n: int, shards: int = 8) -> None:
    """A crawl of n distinct JPEGs (256-512 px) in `shards` tars, with their parquet rows and markers."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from trainer.clip.formats.crawl import crawl_shard
    from trainer.clip.formats.tars import TarSink

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    per = (n + shards - 1) // shards
    for s in range(shards):
        files, rows = crawl_shard(root, s), []
        with open(files.tar, "wb") as f:
            sink = TarSink(f)
            for i in range(s * per, min(n, (s + 1) * per)):
                side = int(rng.integers(256, 513))
                small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=85)
                data, key = buf.getvalue(), f"{i:09d}"
                cap = f"a photo of a {WORDS[i % len(WORDS)]} and a {WORDS[(i * 7) % len(WORDS)]} number {i}"
                meta = {"url": f"http://img.example.com/{key}.jpg", "caption": cap, "key": key, "status": "success",
                        "error_message": None, "error_class": None, "width": side, "height": side,
                        "original_width": side, "original_height": side, "exif": None,
                        "sha256": hashlib.sha256(data).hexdigest()}
                sink.write({"__key__": key, "jpg": data, "txt": cap, "json": json.dumps(meta)})
                rows.append(meta)
            sink.close()
        pq.write_table(pa.Table.from_pylist(rows), files.parquet)
        files.stats.write_text(json.dumps({"count": len(rows), "successes": len(rows)}))


def io_floor(crawl: Path, out: Path) -> float:
    """Read every crawl tar, write every member to a new tar: -> seconds."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, tar in enumerate(sorted(crawl.glob("*.tar"))):
        with tarfile.open(tar) as src, tarfile.open(out / f"copy-{i:05d}.tar", "w") as dst:
            for info in src:
                dst.addfile(info, src.extractfile(info))
    return time.perf_counter() - t0


def floor(n: int, work: Path) -> dict:
    crawl = work / "img-crawl"
    image_crawl(crawl, n, shards=max(2, n // 1000))
    cores = os.cpu_count() or 1
    t_floor = io_floor(crawl, work / "floor")
    f_cmd = [sys.executable, "-m", "pipeline.filter", str(crawl), str(work / "img-filter"), "--near-dup",
             "--min-image-side", "200", "--progress-interval-s", "0"]
    t_filter, rss_f, rc = timed(f_cmd, _env(), work / "filter.log")
    s_cmd = [sys.executable, "-m", "pipeline.shard", str(work / "img-filter"), str(work / "img-shards"),
             "--samples-per-shard", "2000", "--progress-interval-s", "0"]
    t_shard, rss_s, rc2 = timed(s_cmd, _env(), work / "shard.log")
    if rc or rc2:
        raise RuntimeError(f"filter/shard failed: {(work / 'filter.log').read_text()[-2000:]}"
                           f"{(work / 'shard.log').read_text()[-2000:]}")
    kept = json.loads((work / "img-shards" / "manifest.json").read_text())["num_samples"]
    per_core = n / (t_filter + t_shard) / cores
    return {"images": n, "kept": kept, "cores": cores, "floor_s": round(t_floor, 2), "filter_s": round(t_filter, 2),
            "shard_s": round(t_shard, 2), "floor_samples_per_s_per_core": round(n / t_floor / cores, 1),
            "stages_samples_per_s_per_core": round(per_core, 1),
            "floor_over_stages": round((t_filter + t_shard) / t_floor, 2),
            "peak_rss_mb": {"filter": round(rss_f), "shard": round(rss_s)}}


def clip(n: int, work: Path) -> dict:
    """CLIP-score images/s on CPU with a random ViT-B/32 (the filter's actor pool; no filtering)."""
    from trainer.clip.checkpoint import save_model
    from trainer.clip.configs import get_config
    from trainer.clip.model import CLIP

    crawl = work / "clip-crawl"
    image_crawl(crawl, n, shards=2)
    ckpt = work / "vit-b-32"
    save_model(CLIP(get_config("ViT-B-32")), ckpt)
    cmd = [sys.executable, "-m", "pipeline.filter", str(crawl), str(work / "clip-filter"), "--preset", "none",
           "--clip-checkpoint", str(ckpt), "--clip-batch-size", "64", "--progress-interval-s", "0"]
    wall, peak, rc = timed(cmd, _env(), work / "clip.log")
    if rc:
        raise RuntimeError(f"filter with CLIP score failed: {(work / 'clip.log').read_text()[-3000:]}")
    m = json.loads((work / "clip-filter" / "filter_manifest.json").read_text())
    return {"images": n, "model": "ViT-B-32 (random init)", "device": "cpu", "wall_s": round(wall, 1),
            "score_s": m["timings_s"].get("clip_score"), "images_per_s": m["clip_score"].get("images_per_s"),
            "peak_rss_mb": round(peak)}


def run(rows: int = 5_000_000, images: int = 20000, clip_images: int = 512, workdir: str | None = None,
        per_shard: int = 10_000) -> dict:
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-filter-"))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version()}
    if rows:
        result["scale"] = scale(rows, work, per_shard)
    if images:
        result["floor"] = floor(images, work)
    if clip_images:
        result["clip"] = clip(clip_images, work)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--clip-images", type=int, default=512)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    r = run(a.rows, a.images, a.clip_images, a.workdir)
    print(json.dumps(r, indent=2))
    if "scale" in r:
        s = r["scale"]
        print(f"scale: {s['rows']} rows in {s['wall_s']} s ({s['s_per_million_rows']} s per million rows), "
              f"peak RSS {s['peak_rss_tree_mb']} MB (process tree)")
    if "floor" in r:
        f = r["floor"]
        print(f"filter+shard: {f['stages_samples_per_s_per_core']} samples/s/core; I/O floor "
              f"{f['floor_samples_per_s_per_core']}; floor / stages = 1 / {f['floor_over_stages']}")
    if "clip" in r:
        print(f"clip score: {r['clip']['images_per_s']} images/s on CPU")
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
